"""benchmarks/gemv_sass.py: the 4-bit and FP8 GEMVs compile for sm_90 here (ptxas checks the packed-half GEMVs' PTX,
which no CPU test can run) and the packed-half loops are the shorter. In a subprocess: Triton compiles for a target only
when TRITON_INTERPRET is unset when the kernels are defined."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_packed_half_gemv_compiles_shorter() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gemv_sass"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    counts = {(r["kernel"].split(" (")[0], r.get("zero_points")): r["loop_instructions"] for r in rows}
    for zeros in (False, True):
        assert 0 < counts[("quant_gemv_f16x2", zeros)] < counts[("quant_gemv", zeros)]
    assert 0 < counts[("weight_gemv_f16x2 fp8", None)] < counts[("weight_gemv fp8", None)]
