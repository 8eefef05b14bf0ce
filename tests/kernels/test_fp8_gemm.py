"""The CPU emulation of FP8 linears is what torch._scaled_mm computes (#14): on a GPU of compute capability
>= 8.9, Fp8LinearMethod.apply (cuBLASLt, row-wise scales, bf16 out) against the emulated formula (the same
FP8 values and float32 scales, float32 matmul, bf16 out) on fresh random shapes, activations with outlier
channels included. Equal up to float32 summation order and one bf16 rounding. Skipped without such a GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers.quant.fp8 import (
    FP8_GEMV_MAX_M,
    Fp8Config,
    Fp8LinearMethod,
    per_token_quant_torch,
    quantize_rows,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                reason="torch._scaled_mm FP8 needs a GPU of compute capability >= 8.9")


@pytest.mark.parametrize("m,k,n", [(1, 576, 1536), (37, 1536, 576), (256, 4096, 1024), (5, 128, 16), (200, 3584, 4608),
                                   (64, 18944, 3584)])
@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_equals_the_emulation(m: int, k: int, n: int, outliers: bool, fast_accum: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.layers.quant import fp8

    monkeypatch.setattr(fp8, "FAST_ACCUM", fast_accum)
    layer = nn.Module()
    w = torch.randn(n, k, device="cuda") * 0.05
    q, scale = quantize_rows(w)
    layer.weight, layer.weight_scale = nn.Parameter(q, requires_grad=False), nn.Parameter(scale, requires_grad=False)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if outliers:  # a few channels 100x the rest, as the inputs of down_proj carry
        x[:, torch.randperm(k, device="cuda")[:4]] *= 100
    got = Fp8LinearMethod(Fp8Config.dynamic()).apply(layer, x)  # [m, n] bf16
    if m <= FP8_GEMV_MAX_M:  # the weight-only GEMV: x is not quantized
        xq, x_scale_ref = x.float(), torch.ones(m, 1, device="cuda")
    else:  # torch._scaled_mm or gantry_kernels/fp8_gemm.py on per-token FP8 x
        xq, x_scale_ref = per_token_quant_torch(x)  # the Triton kernel's twin (tests/kernels/test_fp8_kv.py)
    exact = (xq.float() @ q.float().t()) * x_scale_ref * scale.view(1, -1)  # float32
    want = exact.to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # the sums differ in order, and Hopper's FP8 MMA keeps ~14 bits between its float32 promotions: allow
    # 2**-12 of the sum of |products|, then half a bf16 ulp of each side's rounding
    magnitude = (xq.float().abs() @ q.float().abs().t()) * x_scale_ref * scale.view(1, -1)
    sums = 2**-12 * magnitude
    err = (got.float() - want.float()).abs()
    assert err.norm() <= 2**-7 * want.float().norm()  # a wrong scale or layout is off by O(1)
    if fast_accum:  # the MMA's own ~14-bit sums over all of K: only the norm is bounded
        return
    assert (err <= sums + 2**-8 * (2 * exact.abs() + sums)).all(), err.max()
