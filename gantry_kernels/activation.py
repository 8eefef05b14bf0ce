"""Triton SiLU-and-mul: [num_tokens, 2 * d] (gate, up) -> silu(gate) * up, rounded as reference.py rounds;
silu_and_mul_fp8 quantizes each token's output for the FP8 GEMM after it (the same bits as silu_and_mul
then gantry_kernels/fp8_quant.py)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gantry_kernels.fp8_quant import FP8_MAX, MIN_SCALE, per_token_quant
from gantry_kernels.pdl import launch_kwargs, wait_prior


@triton.jit
def _silu_mul_block(x_ptr, row, cols, mask, d, stride_x):
    """silu(gate) * up at cols of one token's row, float32 holding values of the input dtype."""
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # F.silu rounds to the input dtype
    return (act.to(tl.float32) * up.to(tl.float32)).to(up.dtype).to(tl.float32)  # rounded as the output is


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * d]
    out_ptr,  # [num_tokens, d]
    d,
    stride_x,
    stride_o,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_prior(PDL)  # gantry_kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    out = _silu_mul_block(x_ptr, row, cols, mask, d, stride_x)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_fp8_kernel(
    x_ptr,  # [num_tokens, 2 * d]
    q_ptr,  # [num_tokens, d] float8_e4m3fn
    scale_ptr,  # [num_tokens] float32
    d,
    stride_x,
    stride_q,
    FP8_MAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program a token: its largest |output| first, then the row again (from L2) quantized."""
    wait_prior(PDL)
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], tl.float32)
    for c0 in range(0, d, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_silu_mul_block(x_ptr, row, cols, cols < d, d, stride_x)))
    scale = tl.maximum(tl.max(amax, 0) / FP8_MAX, MIN_SCALE)
    for c0 in range(0, d, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        out = _silu_mul_block(x_ptr, row, cols, cols < d, d, stride_x)
        q = tl.clamp(out / scale, -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=cols < d)
    tl.store(scale_ptr + row, scale)


# One program a token walks its row twice, so a decode batch has too few programs to hide the loads: on an
# H200 at W1's d = 18,944 and 256 rows it took 16 us (18.6 with 8,192-wide blocks) against 11 for SiLU-and-mul
# then gantry_kernels/fp8_quant.py. Below this many rows silu_and_mul_fp8 runs those two kernels instead.
FUSED_MIN_ROWS = 1024


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 2 * d] (gate, up) -> (float8_e4m3fn [num_tokens, d], float32 scale [num_tokens, 1])."""
    if x.numel() < FUSED_MIN_ROWS * x.shape[-1]:
        return per_token_quant(silu_and_mul(x).reshape(-1, x.shape[-1] // 2))
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)  # [num_tokens, 2 * d]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty((x2.shape[0], d), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device)
    if x2.shape[0] > 0 and d > 0:
        block = min(2048, triton.next_power_of_2(d))
        _silu_and_mul_fp8_kernel[(x2.shape[0],)](
            x2, q, scale, d, x2.stride(0), q.stride(0), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, BLOCK=block,
            num_warps=8 if block >= 1024 else 4, **launch_kwargs(x.device),
        )
    return q, scale


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate, up) -> [..., d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)  # [num_tokens, 2 * d]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and d > 0:
        block = min(1024, triton.next_power_of_2(d))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, d, x2.stride(0), out.stride(0), BLOCK=block, num_warps=4, **launch_kwargs(x.device)
        )
    return out.view(*x.shape[:-1], d)
