"""kernels/fp8_gemv.py (weight-only FP8 for decode rows) against float32 math on the same e4m3 values and
row scales: split-K or not, partial tiles along N and K, with and without bias (Triton's interpreter on
CPU, the GPU where present)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.layers.quant.fp8 import quantize_rows
from kernels.fp8_gemv import fp8_gemv

Check = Callable[[torch.Tensor, torch.Tensor], None]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k,config", [(80, 1000, (64, 128, 4, 1)), (80, 1000, (64, 128, 4, 3)),
                                        (128, 512, (32, 64, 2, 4)), (200, 384, None)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_gemv_matches_float32(m: int, n: int, k: int, config: tuple | None, with_bias: bool,
                                  device: torch.device, assert_close: Check) -> None:
    w = torch.randn(n, k, device=device) * 0.05
    w[:, 7] *= 40  # an outlier column: the row scales span a wide range
    wq, scale = quantize_rows(w)  # float8_e4m3fn [N, K], float32 [N]
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device) if with_bias else None
    want = x @ (wq.float() * scale[:, None]).t() + (bias if with_bias else 0)
    assert_close(fp8_gemv(x, wq, scale, bias, config), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_gemv_bf16_activations() -> None:
    """The engine's case: bf16 x and output, float32 accumulation inside."""
    w = torch.randn(384, 2048, device="cuda") * 0.05
    wq, scale = quantize_rows(w)
    x = torch.randn(2, 2048, device="cuda").to(torch.bfloat16)
    want = x.float() @ (wq.float() * scale[:, None]).t()
    torch.testing.assert_close(fp8_gemv(x, wq, scale).float(), want, rtol=1e-2, atol=1e-2)
