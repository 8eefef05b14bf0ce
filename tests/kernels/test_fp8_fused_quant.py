"""RMSNorm and SiLU-and-mul with their output quantized per token in the same kernel (fp8_out, for the FP8
GEMM after them) give the same bits as the plain kernel followed by gantry_kernels/fp8_quant.py: FP8 values and
scales, the new residual too. On the GPU and in Triton's interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

import gantry_kernels.activation
from gantry_kernels.activation import silu_and_mul, silu_and_mul_fp8
from gantry_kernels.fp8_quant import per_token_quant
from gantry_kernels.norm import fused_add_rms_norm, rms_norm, rms_norm_fp8

DTYPES = [torch.bfloat16, torch.float16]


def same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8) if got.element_size() == 1 else got, want.view(torch.uint8)
                       if want.element_size() == 1 else want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 96), (33, 256)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8(device: torch.device, dtype: torch.dtype, rows: int, hidden: int, with_residual: bool) -> None:
    x = torch.randn(rows, hidden, device=device, dtype=dtype) * 3
    x[:, 5] *= 50  # an outlier channel sets the scale
    x[0] = 0  # an all-zero row: the smallest scale, zeros out
    weight = (torch.rand(hidden, device=device) + 0.5).to(dtype)
    residual = torch.randn_like(x) if with_residual else None
    q, scale, new_residual = rms_norm_fp8(x, residual, weight, 1e-6)
    if residual is None:
        plain, want_residual = rms_norm(x, weight, 1e-6), None
    else:
        plain, want_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
        assert new_residual is not None
        same_bits(new_residual, want_residual)
    want_q, want_scale = per_token_quant(plain)
    same_bits(q, want_q)
    same_bits(scale, want_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 128), (5, 3000), (16, 200)])  # 3000: more than one 2048 block a row
@pytest.mark.parametrize("fused_min_rows", [0, 1024])  # the one-kernel path, and two kernels below 1024 rows
def test_silu_and_mul_fp8(device: torch.device, dtype: torch.dtype, rows: int, d: int, fused_min_rows: int,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gantry_kernels.activation, "FUSED_MIN_ROWS", fused_min_rows)
    x = torch.randn(rows, 2 * d, device=device, dtype=dtype) * 4
    x[:, d + 3] *= 30
    q, scale = silu_and_mul_fp8(x)
    want_q, want_scale = per_token_quant(silu_and_mul(x))
    same_bits(q, want_q)
    same_bits(scale, want_scale)
