"""benchmarks/tp_scaling.py on CPU (--smoke): the plumbing of the GPU run (a fresh subprocess per
config, spawned ranks, ratios, the all-reduce profile), and a failing config failing the run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.tp_scaling import parse_config

REPO = Path(__file__).resolve().parents[2]


def run_bench(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "benchmarks.tp_scaling", "--smoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def test_config_names() -> None:
    assert parse_config("w1:tp2") == ("w1", 2, 1)
    assert parse_config("w3:pp2") == ("w3", 1, 2)
    assert parse_config("w3:tp2pp2") == ("w3", 2, 2)
    with pytest.raises(SystemExit, match="w3:2"):
        parse_config("w3:2")


@pytest.mark.slow
def test_smoke_run_reports_ratio_and_all_reduce_share(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = run_bench(["--configs", "w1:tp1,w1:tp2", "--allreduce-batch", "8", "--json", str(out)], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads(out.read_text())
    assert results["w1:tp1"]["output_tok_s"] > 0 and "all_reduce" not in results["w1:tp1"]
    tp2 = results["w1:tp2"]
    assert tp2["ratio_vs_tp1"] == pytest.approx(tp2["output_tok_s"] / results["w1:tp1"]["output_tok_s"])
    ar = tp2["all_reduce"]
    assert ar["batch"] == 8 and 0 < ar["all_reduce_ms"] < ar["step_ms"] and 0 < ar["fraction_of_step"] < 1
    assert ar["calls_per_step"] == 2 * 4 + 1  # two per layer (attention, MLP) and the embedding
    assert "w1:tp2" in proc.stdout and "% of" in proc.stdout


@pytest.mark.slow
def test_failed_config_fails_the_run(tmp_path: Path) -> None:
    proc = run_bench(["--configs", "w1:tp1", "--max-num-seqs", "0"], tmp_path)
    assert proc.returncode != 0
    assert "w1:tp1: FAILED (exit code 1)" in proc.stdout and "max_num_seqs: must be >= 1" in proc.stdout
    assert "FAILED: w1:tp1" in proc.stderr
