"""The decode GEMVs compiled for the H200 (sm_90) without a GPU: SASS instructions in each kernel's loop body.

Triton compiles for a target named here (ptxas and nvdisasm ship in its wheel), so the instructions of a K tile
can be compared on any machine, and the packed-half kernel's PTX is checked by ptxas on the way. Arguments are
specialized as Triton's runtime specializes them: an int argument equal to 1 (a layout's unit strides) becomes a
constant, and the others, and every pointer, are marked divisible by 16 (W1's sizes and strides are; torch's
allocations are aligned), except tiles_per_split (4 at W1's 4-bit table configs) and what the kernel leaves
unspecialized. Without that the loads come out scalar (LDG.E per word) where the device runs LDG.E.128.
- 4-bit: gantry_kernels/quant_gemv.py (float32 arithmetic) against gantry_kernels/quant_gemv_f16x2.py, a tile of 128 rows x 16
  words on 4 warps (128 values a thread), in compressed-tensors' symmetric layout and in GPTQ's with zero points;
- FP8, for reference: gantry_kernels/weight_gemv.py, 8 rows x 512 weights on 2 warps loaded into registers, and at
  W1 gate_up's table config, where the tiles stream through shared memory (cp.async: LDGSTS) several stages ahead.
One JSON line a kernel: the loop's instruction count, a thread's values a tile, the commonest opcodes and the
global loads by width. Speed still needs the device (decode_gemv_bench --dtypes w4,w4x2,fp8).
    python -m benchmarks.gemv_sass
"""
from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gantry_kernels import quant_gemm, quant_gemv, quant_gemv_f16x2, weight_gemv

POINTERS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i32", "g_ptr": "*i32",
            "bias_ptr": "*bf16", "out_ptr": "*fp32", "ws_ptr": "*fp32"}
TILE = {"GROUP": 128, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_N": 128, "BLOCK_KP": 16}
STRIDES = ("stride_qa", "stride_qb", "stride_sg", "stride_sn", "stride_zg", "stride_zn")  # PackedWeight.strides
SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+(?:\.[A-Z0-9_]+)*)")


def sass(fn, constexprs: dict, num_warps: int = 4, pointers: dict | None = None, ones: tuple[str, ...] = (),
         unaligned: tuple[str, ...] = ("tiles_per_split",)) -> str:
    """nvdisasm's listing of fn compiled for sm_90, its arguments specialized as at run time: the int arguments
    named in ones equal 1 (constants), those in unaligned are not multiples of 16, the rest are."""
    types = {**POINTERS, **(pointers or {})}
    const = {**constexprs, **{name: 1 for name in ones}}
    signature = {name: "constexpr" if name in const else types.get(name, "i32") for name in fn.arg_names}
    plain = set(unaligned) | {p.name for p in fn.params if p.do_not_specialize or p.do_not_specialize_on_alignment}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name not in const and name not in plain}
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(fn.arg_names.index(name),): value for name, value in const.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def loop_body(listing: str) -> list[str]:
    """The opcodes (with their modifiers, e.g. LDG.E.128) of the longest loop: from a label to the branch back."""
    lines = listing.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"\s*\.L_x_\d+:", line)}
    best: list[str] = []
    for i, line in enumerate(lines):
        target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if target and target.group(1) in labels and labels[target.group(1)] < i:
            body = [m.group(2) for m in map(SASS_LINE.search, lines[labels[target.group(1)]:i + 1]) if m]
            best = max(best, body, key=len)
    return best


def unit_strides(layout: str, zero_points: bool) -> tuple[str, ...]:
    """The PackedWeight strides equal to 1 for the layout's tensors as the engine holds them (CPU, tiny shapes):
    compressed-tensors qweight [N, K / 8], scales [N, groups], stored out-major once loaded; GPTQ qweight
    [K / 8, N], scales [groups, N], zeros [groups, N / 8]."""
    n, k = 256, 1024
    if layout == "compressed-tensors":
        qweight, scales, zeros = torch.zeros(k // 8, n, dtype=torch.int32).t(), torch.zeros(k // 128, n).t(), None
    else:
        qweight, scales = torch.zeros(k // 8, n, dtype=torch.int32), torch.zeros(k // 128, n)
        zeros = torch.zeros(k // 128, n // 8, dtype=torch.int32) if zero_points else None
    w = quant_gemm.prepare(qweight, scales, zeros, None, 4, 128, layout, k)
    return tuple(name for name, stride in zip(STRIDES, w.strides) if stride == 1)


def main() -> None:
    kernels = {
        "quant_gemv (float32)": (quant_gemv._gemv_kernel, {"BITS": 4, "HAS_G_IDX": False, "SCALE_PER_TILE": True}),
        "quant_gemv_f16x2 (PTX)": (quant_gemv_f16x2._gemv_f16x2_kernel, {"USE_PTX": True, "PDL": False}),
    }
    values = TILE["BLOCK_N"] * TILE["BLOCK_KP"] * 8 // (32 * 4)  # a thread's 4-bit values a tile
    for zeros, layout in ((False, "compressed-tensors"), (True, "gptq")):
        ones = unit_strides(layout, zeros)
        for name, (fn, extra) in kernels.items():
            body = loop_body(sass(fn, {**TILE, **extra, "HAS_ZEROS": zeros}, ones=ones))
            emit(name, body, values, zero_points=zeros, layout=layout, ones=list(ones))
    # GANTRY_PDL (gantry_kernels/pdl.py): griddepcontrol.wait (ACQBULK) and launch_dependents (PREEXIT), outside the loop
    listing = sass(quant_gemv_f16x2._gemv_f16x2_kernel, {**TILE, "USE_PTX": True, "PDL": True, "HAS_ZEROS": False},
                   ones=unit_strides("compressed-tensors", False))
    ops = [m.group(2) for m in map(SASS_LINE.search, listing.splitlines()) if m]
    print(json.dumps({"figure": "gemv_sass_pdl", "kernel": "quant_gemv_f16x2 (PTX, PDL)", "wait": ops.count("ACQBULK"),
                      "launch_dependents": ops.count("PREEXIT"), "loop_instructions": len(loop_body(listing))}))
    fp8 = {"HAS_SCALE": True, "HAS_BIAS": False, "EVEN_K": True, "BLOCK_N": 8, "BLOCK_K": 512, "PDL": False,
           "NUM_STAGES": 1}
    body = loop_body(sass(weight_gemv._weight_gemv_kernel, fp8, num_warps=2, pointers={"w_ptr": "*fp8e4nv"}))
    emit("weight_gemv fp8 (float32)", body, 8 * 512 // 64)
    block_n, block_k, num_warps, _, stages = weight_gemv.GEMV_TABLE[(37888, 3584, 1)]  # W1 gate_up's table config
    fp8.update(BLOCK_N=block_n, BLOCK_K=block_k, NUM_STAGES=stages)
    body = loop_body(sass(weight_gemv._weight_gemv_kernel, fp8, num_warps=num_warps, pointers={"w_ptr": "*fp8e4nv"}))
    emit("weight_gemv fp8 pipelined (table config)", body, block_n * block_k // (32 * num_warps), stages=stages,
         async_loads=dict(collections.Counter(op for op in body if op.startswith("LDGSTS"))))


def emit(kernel: str, body: list[str], values: int, **extra) -> None:
    top = collections.Counter(op.split(".")[0] for op in body).most_common(8)
    loads = collections.Counter(op for op in body if op.startswith("LDG"))
    print(json.dumps({"figure": "gemv_sass", "kernel": kernel, **extra, "loop_instructions": len(body),
                      "per_value": round(len(body) / values, 2), "top": dict(top), "global_loads": dict(loads)}))


if __name__ == "__main__":
    main()
