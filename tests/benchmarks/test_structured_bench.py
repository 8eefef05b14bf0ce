"""benchmarks/structured_bench.py on CPU (--smoke): the GPU run's plumbing (stand-in tokenizer, the
schema compiled against it, constrained and unconstrained runs to max_tokens, the ratio line)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_run_prints_each_figure_and_the_ratio(tmp_path: Path) -> None:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.structured_bench", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    figures = {line.get("figure"): line for line in lines}
    assert not [line for line in lines if "warning" in line]  # every constrained request ran to max_tokens
    for name in ("unconstrained", "json_schema", "unconstrained_again"):
        assert figures[f"structured_bench_{name}"]["output_tokens"] == 8 * 16
    assert figures["structured_bench_json_schema"]["bitmask_fill_steps"] > 0  # the fill's CPU ms per step
    assert "bitmask_fill_ms_per_step" not in figures["structured_bench_unconstrained"]
    ratio = figures["structured_vs_unconstrained"]
    assert ratio["bitmask_overlap"] is True  # async scheduling in one process: filled while the forward runs
    assert ratio["device"] == "cpu" and ratio["ratio"] == pytest.approx(
        ratio["json_schema_tok_s"] / ratio["unconstrained_tok_s"], abs=0.002)
