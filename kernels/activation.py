"""Triton SiLU-and-mul: [num_tokens, 2 * d] (gate, up) -> silu(gate) * up, rounded as reference.py rounds."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_kwargs, wait_prior


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
    wait_prior(PDL)  # kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # F.silu rounds to the input dtype
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


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
