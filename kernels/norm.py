"""Triton RMSNorm, alone and fused with the residual add (one read of x and residual, one pass).

Rounding follows reference.py: normalise in fp32, round to the input dtype, then scale by the weight.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_kwargs, wait_prior


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden]
    residual_ptr,  # [num_rows, hidden], read only when ADD_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden]
    new_residual_ptr,  # [num_rows, hidden], written only when ADD_RESIDUAL
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_prior(PDL)  # kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(new_residual_ptr + row * stride_nr + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous()
    x2 = x.reshape(-1, hidden)  # [num_rows, hidden]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
    new_residual = None
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        new_residual = torch.empty_like(x2)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, new_residual if new_residual is not None else out, eps,
            x2.stride(0), r2.stride(0), out.stride(0),
            new_residual.stride(0) if new_residual is not None else 0,
            HIDDEN=hidden,
            BLOCK=block,
            ADD_RESIDUAL=residual is not None,
            num_warps=min(16, max(1, block // 512)),
            **launch_kwargs(x.device),
        )
    out = out.view(x.shape)
    return out, None if new_residual is None else new_residual.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden]; weight: [hidden]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + residual; return (rms_norm(residual), residual), both new tensors."""
    assert residual.shape == x.shape
    out, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual
