"""benchmarks/gemv_sass.py: the decode GEMVs compile for sm_90 here (ptxas checks the 4-bit packed-half GEMV's PTX,
which no CPU test can run), specialized as at run time: each thread's weights come in 128-bit loads (by cp.async
where the FP8 GEMV's table pipelines its tiles), the 4-bit packed-half loop is the shorter, and GANTRY_PDL adds its
wait and early launch outside the loop. In a subprocess: Triton compiles for a target only when TRITON_INTERPRET is
unset when the kernels are defined."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gemv_sass_runtime_specialized() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gemv_sass"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    rows = {(r["kernel"].split(" (")[0], r.get("zero_points")): r for r in lines if r["figure"] == "gemv_sass"}
    pdl = next(r for r in lines if r["figure"] == "gemv_sass_pdl")  # one wait, one early launch, the loop unchanged
    assert (pdl["wait"], pdl["launch_dependents"]) == (1, 1), pdl
    assert pdl["loop_instructions"] == rows[("quant_gemv_f16x2", False)]["loop_instructions"], pdl
    assert set(rows) == {("quant_gemv", False), ("quant_gemv_f16x2", False), ("quant_gemv", True),
                         ("quant_gemv_f16x2", True), ("weight_gemv fp8", None), ("weight_gemv fp8 pipelined", None)}
    piped = rows[("weight_gemv fp8 pipelined", None)]  # no loads into registers in the loop: 16-byte cp.async
    assert piped["stages"] > 1 and not [op for op in piped["global_loads"] if op.startswith("LDG.E")], piped
    assert piped["async_loads"].get("LDGSTS.E.BYPASS.128", 0) > 0, piped
    for zeros in (False, True):
        assert 0 < rows[("quant_gemv_f16x2", zeros)]["loop_instructions"] < rows[("quant_gemv", zeros)]["loop_instructions"]
        for kernel in ("quant_gemv", "quant_gemv_f16x2"):  # 128 x 16 words on 128 threads: 16 words, 4 loads of 128 bits
            assert rows[(kernel, zeros)]["global_loads"].get("LDG.E.128") == 4, rows[(kernel, zeros)]
    fp8 = rows[("weight_gemv fp8", None)]  # 8 x 512 bytes on 64 threads: 64 bytes a thread, and x's 8 bf16
    assert fp8["loop_instructions"] > 0 and fp8["global_loads"] == {"LDG.E.128": 5}, fp8
