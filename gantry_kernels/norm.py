"""Triton RMSNorm, alone and fused with the residual add (one read of x and residual, one pass).

Rounding follows reference.py: normalise in fp32, round to the input dtype, then scale by the weight.
With fp8_out the row is then quantized per token for the FP8 GEMM after it (gantry_kernels/fp8_quant.py's
rounding on the output as rounded to its dtype, so the same bits as norm then quant), in the same pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gantry_kernels.fp8_quant import FP8_MAX, MIN_SCALE
from gantry_kernels.pdl import launch_kwargs, wait_prior


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden]
    residual_ptr,  # [num_rows, hidden], read only when ADD_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden]: the model's dtype, or float8_e4m3fn when QUANT
    new_residual_ptr,  # [num_rows, hidden], written only when ADD_RESIDUAL
    scale_ptr,  # [num_rows] float32, written only when QUANT
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,
    ROUND_OUT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_prior(PDL)  # gantry_kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
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
    if QUANT:
        if ROUND_OUT:  # the half-precision output an unfused quantization would read
            out = out.to(x.dtype).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(out), 0) / FP8_MAX, MIN_SCALE)
        tl.store(scale_ptr + row, scale)
        out = tl.clamp(out / scale, -FP8_MAX, FP8_MAX)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            fp8_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(out, new residual or None, per-token scale [num_rows, 1] or None); out is FP8 with fp8_out."""
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous()
    x2 = x.reshape(-1, hidden)  # [num_rows, hidden]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out_dtype = torch.float8_e4m3fn if fp8_out else torch.result_type(x, weight)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    scale = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device) if fp8_out else None
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
            x2, r2, weight, out, new_residual if new_residual is not None else out,
            scale if scale is not None else weight, eps,
            x2.stride(0), r2.stride(0), out.stride(0),
            new_residual.stride(0) if new_residual is not None else 0,
            HIDDEN=hidden,
            BLOCK=block,
            ADD_RESIDUAL=residual is not None,
            QUANT=fp8_out,
            ROUND_OUT=torch.result_type(x, weight) == x.dtype and x.dtype != torch.float32,
            FP8_MAX=FP8_MAX,
            MIN_SCALE=MIN_SCALE,
            num_warps=min(16, max(1, block // 512)),
            **launch_kwargs(x.device),
        )
    return out if fp8_out else out.view(x.shape), None if new_residual is None else new_residual.view(x.shape), scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden]; weight: [hidden]."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + residual; return (rms_norm(residual), residual), both new tensors."""
    assert residual.shape == x.shape
    out, new_residual, _ = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual


def rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RMSNorm (after the residual add when residual is given), quantized per token for an FP8 GEMM:
    (float8_e4m3fn [num_rows, hidden], float32 scale [num_rows, 1], new residual [..., hidden] or None)."""
    out, new_residual, scale = _launch(x, residual, weight, eps, fp8_out=True)
    return out, scale, new_residual
