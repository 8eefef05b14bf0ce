"""Programmatic dependent launch (Hopper and later): a decode kernel starts while the kernel before it finishes.

A decode step is a chain of short kernels (RMSNorm, GEMV, split sums, rotary, KV store, attention, SiLU-and-mul,
at W1's shape 2-30 µs each), and each boundary costs a launch and a ramp. On sm_90+ these Triton kernels
are launched with CUDA's programmatic stream serialization (`launch_pdl`): once every program of the kernel before
has passed `wait_prior` (each calls launch_dependents right after its own wait), the next kernel's programs start
and park in their own wait, so its launch overlaps the previous kernel's tail. Before its wait a kernel writes
nothing and reads only weights, which no kernel writes: the GEMVs (quant_gemv_f16x2.py, weight_gemv.py) and the
few-row 4-bit kernel (quant_mma.py) load their first weight tile there; the GGUF GEMV (ggml_gemv.py) waits first.
A kernel launched without it (torch's, cuBLAS's) is an ordinary boundary. CUDA graph capture keeps the dependency
as a programmatic edge.

On by default (GANTRY_PDL=0 turns it off): on the H200 it took W1's one-stream decode from 4.16 to 3.92 ms a token
in bf16, 2.30 to 2.11 at 4 bits and 2.93 to 2.69 in FP8 (benchmarks/RESULTS.md, seventeenth session). On CPU and
before sm_90 it is always off.
"""
from __future__ import annotations

import os
from functools import cache

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

# Triton's PDL (gdc_wait, launch_pdl: triton-lang/triton#6394, 2025); with an older Triton every launch is plain
PDL = os.environ.get("GANTRY_PDL", "1") == "1" and hasattr(tl_cuda, "gdc_wait")


@cache
def _supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def launch_kwargs(device: torch.device) -> dict:
    """Extra arguments for a launch of a kernel that calls wait_prior(PDL): PDL, and launch_pdl where it is on."""
    if PDL and _supported(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_prior(PDL: tl.constexpr):
    """Wait until the kernel before has finished and its writes are visible, then let the next kernel launch."""
    if PDL:
        tl_cuda.gdc_wait()
        tl_cuda.gdc_launch_dependents()
