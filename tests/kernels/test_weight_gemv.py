"""gantry_kernels/weight_gemv.py (the decode GEMV of FP8 weights with row scales, and of bf16/fp16 weights) against
float32 math on the same values: split-K or not, partial tiles along N and K, with and without bias (Triton's
interpreter on CPU, the GPU where present)."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.layers.quant.fp8 import quantize_rows
from gantry_kernels.weight_gemv import weight_gemv

Check = Callable[[torch.Tensor, torch.Tensor], None]


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k,config", [(80, 1000, (64, 128, 4, 1, 1)), (80, 1000, (64, 128, 4, 3, 1)),
                                        (128, 512, (32, 64, 2, 4, 1)), (80, 1000, (16, 64, 2, 2, 4)),
                                        (200, 384, None)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_weights_match_float32(m: int, n: int, k: int, config: tuple | None, with_bias: bool,
                                  device: torch.device, assert_close: Check) -> None:
    w = torch.randn(n, k, device=device) * 0.05
    w[:, 7] *= 40  # an outlier column: the row scales span a wide range
    wq, scale = quantize_rows(w)  # float8_e4m3fn [N, K], float32 [N]
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device) if with_bias else None
    want = x @ (wq.float() * scale[:, None]).t() + (bias if with_bias else 0)
    assert_close(weight_gemv(x, wq, scale, bias, config), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(384, 2048), (7168, 5120), (5120, 27648)])  # the rule's config: 32B's qkv and down
def test_fp8_weights_bf16_activations(n: int, k: int) -> None:
    """The engine's case: bf16 x and output, float32 accumulation inside."""
    w = torch.randn(n, k, device="cuda") * 0.05
    wq, scale = quantize_rows(w)
    x = torch.randn(2, k, device="cuda").to(torch.bfloat16)
    want = x.float() @ (wq.float() * scale[:, None]).t()
    torch.testing.assert_close(weight_gemv(x, wq, scale).float(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("n,k,config", [(80, 1000, (8, 512, 8, 1, 1)), (80, 1000, (8, 256, 2, 3, 1)),
                                        (80, 1000, (8, 128, 2, 1, 5)), (200, 384, None), (36, 600, None)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_unscaled_weights_match_float32(m: int, n: int, k: int, config: tuple | None, with_bias: bool,
                                        device: torch.device, assert_close: Check) -> None:
    """Plain (unscaled) weights, as one-row decode runs bf16 layers; float32 here so the interpreter's math is
    exact enough to compare."""
    w = torch.randn(n, k, device=device) * 0.05
    x = torch.randn(m, k, device=device)
    bias = torch.randn(n, device=device) if with_bias else None
    want = x @ w.t() + (bias if with_bias else 0)
    assert_close(weight_gemv(x, w, None, bias, config), want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n,k", [(4608, 3584), (3584, 18944), (576, 576)])
def test_bf16_weights_match_float32(n: int, k: int) -> None:
    """The engine's bf16 decode row: within bf16 output rounding of the float32 product (the table's configs
    for W1's shapes, the rule elsewhere)."""
    w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    want = x.float() @ w.float().t() + bias.float()
    torch.testing.assert_close(weight_gemv(x, w, None, bias).float(), want, rtol=1e-2, atol=1e-2)
