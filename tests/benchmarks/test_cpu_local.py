"""benchmarks/cpu_local.py, Gantry's side only (no llama.cpp in CI): a short run against the embedded
model prints its figures as JSON lines, with every requested token counted; the RSS walk sees children."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.cpu_local import prompt, tree_rss

REPO = Path(__file__).resolve().parents[2]


def test_tree_rss_counts_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(64 << 20); import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while tree_rss(child.pid) < 64 << 20:  # the child's bytearray is resident once written
            assert time.monotonic() < deadline, "the child's 64 MiB never showed"
            time.sleep(0.1)
        with open("/proc/self/statm") as f:
            own = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert tree_rss(os.getpid()) >= own + (64 << 20)  # this process and its child
    finally:
        child.kill()
        child.wait()


def test_gantry_side_runs_and_counts_every_token() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.cpu_local", "--gantry-only", "--rounds", "1",
                        "--stream-tokens", "12", "--concurrency", "3", "--concurrent-tokens", "5",
                        "--gantry-arg=--max-model-len", "--gantry-arg=512"],
                       cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    run = next(row for row in rows if row.get("server") == "gantry" and "round" in row)
    assert run["stream_tokens"] == 12 and run["concurrent_tokens"] == 3 * 5  # ignore_eos: every token came
    assert run["startup_s"] > 0 and run["ttft_ms"] > 0 and run["decode_tok_s"] > 0 and run["concurrent_tok_s"] > 0
    assert run["peak_rss_mib"] > 100  # the engine core has torch
    assert sum(run["peak_rss_by_process_mib"].values()) in range(run["peak_rss_mib"] - 2, run["peak_rss_mib"] + 3)
    assert "loadavg" in run and any("loadavg_end" in row for row in rows)
    assert prompt("tea").endswith("<|im_start|>assistant\n")
