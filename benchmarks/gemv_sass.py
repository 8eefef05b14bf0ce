"""The decode GEMVs compiled for the H200 (sm_90) without a GPU: SASS instructions in each kernel's loop body.

Triton compiles for a target named here (ptxas and nvdisasm ship in its wheel), so the instructions of a K tile
can be compared on any machine, and the packed-half kernels' PTX is checked by ptxas on the way:
- 4-bit: kernels/quant_gemv.py (float32 arithmetic) against kernels/quant_gemv_f16x2.py, a tile of 128 rows x 16
  words on 4 warps (128 values a thread);
- FP8: kernels/weight_gemv.py against kernels/weight_gemv_f16x2.py at W1 gate_up's table config, 8 rows x 512
  weights on 2 warps (64 weights a thread).
Speed still needs the device (decode_gemv_bench --dtypes w4,w4x2,fp8,fp8x2).
    python -m benchmarks.gemv_sass
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import quant_gemv, quant_gemv_f16x2, weight_gemv, weight_gemv_f16x2

POINTERS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i32", "g_ptr": "*i32",
            "bias_ptr": "*bf16", "out_ptr": "*fp32", "ws_ptr": "*fp32"}
TILE = {"GROUP": 128, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_N": 128, "BLOCK_KP": 16}
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")


def sass(fn, constexprs: dict, num_warps: int = 4, pointers: dict | None = None) -> str:
    """nvdisasm's listing of fn compiled for sm_90."""
    types = {**POINTERS, **(pointers or {})}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def loop_body(listing: str) -> list[str]:
    """The opcodes of the longest loop: from a label to the branch back to it."""
    lines = listing.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"\s*\.L_x_\d+:", line)}
    best: list[str] = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if target and target.group(1) in labels and labels[target.group(1)] < i:
            body = [m.group(2) for m in map(SASS_LINE.search, lines[labels[target.group(1)]:i + 1]) if m]
            best = max(best, body, key=len)
    return best


def main() -> None:
    kernels = {
        "quant_gemv (float32)": (quant_gemv._gemv_kernel, {"BITS": 4, "HAS_G_IDX": False, "SCALE_PER_TILE": True}),
        "quant_gemv_f16x2 (PTX)": (quant_gemv_f16x2._gemv_f16x2_kernel, {"USE_PTX": True}),
    }
    for zeros in (False, True):
        for name, (fn, extra) in kernels.items():
            body = loop_body(sass(fn, {**TILE, **extra, "HAS_ZEROS": zeros}))
            values = TILE["BLOCK_N"] * TILE["BLOCK_KP"] * 8 // (32 * 4)  # a thread's values a tile
            emit(name, body, values, zero_points=zeros)
    fp8 = {"HAS_SCALE": True, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_N": 8}
    for name, fn, extra, w_type in (
            ("weight_gemv fp8 (float32)", weight_gemv._weight_gemv_kernel, {"BLOCK_K": 512}, "*fp8e4nv"),
            ("weight_gemv_f16x2 fp8 (PTX)", weight_gemv_f16x2._fp8_gemv_f16x2_kernel, {"BLOCK_KW": 128, "USE_PTX": True},
             "*i32")):
        emit(name, loop_body(sass(fn, {**fp8, **extra}, num_warps=2, pointers={"w_ptr": w_type})), 8 * 512 // 64)


def emit(kernel: str, body: list[str], values: int, **extra) -> None:
    print(json.dumps({"figure": "gemv_sass", "kernel": kernel, **extra, "loop_instructions": len(body),
                      "per_value": round(len(body) / values, 2), "top": dict(collections.Counter(body).most_common(8))}))


if __name__ == "__main__":
    main()
