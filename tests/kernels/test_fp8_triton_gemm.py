"""gantry_kernels/fp8_gemm.py against the float32 formula on the same FP8 values and scales: tiles, K splits (even
and uneven), rows and columns past a tile's edge, with and without bias. On the GPU and in Triton's
interpreter on CPU."""
from __future__ import annotations

import pytest
import torch

from gantry_kernels.fp8_gemm import GemmConfig, fp8_gemm, supports

if torch.cuda.is_available():
    DEVICE = "cuda"
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 tl.dot needs sm_89 or newer", allow_module_level=True)
else:
    DEVICE = "cpu"  # tests/kernels/conftest.py runs Triton's interpreter

CASES = [  # (M, N, K, config)
    (5, 96, 256, GemmConfig(16, 32, 128, 1, 4, 2)),
    (37, 80, 512, GemmConfig(16, 32, 128, 2, 4, 2, 2)),
    (37, 80, 640, GemmConfig(32, 16, 64, 3, 4, 2, 1)),  # 10 tiles over 3 splits: 4, 4, 2
    (64, 128, 384, GemmConfig(64, 64, 128, 1, 4, 3)),
]
if DEVICE == "cuda":
    CASES += [(256, 3584, 3584, GemmConfig(64, 128, 128, 4, 4, 4)), (200, 4608, 3584, GemmConfig(128, 256, 128, 1, 8, 3)),
              (33, 3584, 18944, GemmConfig(64, 64, 128, 4, 4, 4))]


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448  # [rows, 1]
    return (t / scale).to(torch.float8_e4m3fn), scale


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m,n,k,config", CASES)
def test_matches_formula(m: int, n: int, k: int, config: GemmConfig, with_bias: bool) -> None:
    x = torch.randn(m, k)  # fresh draws, seeded per test by tests/kernels/conftest.py
    w = torch.randn(n, k)
    x[:, 3] *= 40  # an outlier channel, as real activations have
    xq, xs = quantize(x)
    wq, ws = quantize(w)
    bias = torch.randn(n).to(torch.bfloat16) if with_bias else None
    exact = (xq.float() @ wq.float().t()) * xs * ws.view(1, -1)  # float32
    magnitude = (xq.float().abs() @ wq.float().abs().t()) * xs * ws.view(1, -1)
    if bias is not None:
        exact += bias.float()
        magnitude += bias.float().abs()
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    got = fp8_gemm(dev(xq), dev(xs), dev(wq), dev(ws.view(-1)), config, dev(bias)).float().cpu()
    assert got.shape == (m, n)
    # as tests/kernels/test_fp8_gemm.py allows cuBLASLt: other summation order and ~14-bit MMA sums between
    # float32 promotions (2**-12 of the sum of |products|), then the bf16 rounding of the output; Triton's
    # interpreter sums an FP8 dot in float16 (11 bits)
    sums = (2**-12 if DEVICE == "cuda" else 2**-9) * magnitude
    err = (got - exact).abs()
    assert (err <= sums + 2**-8 * exact.abs()).all(), (err - sums - 2**-8 * exact.abs()).max()
    assert err.norm() <= 2**-7 * exact.norm()


def test_supports_whole_tiles_only() -> None:
    assert supports(256, GemmConfig(64, 64, 128, 2, 4, 3))
    assert not supports(200, GemmConfig(64, 64, 128, 1, 4, 3))
    assert not supports(256, GemmConfig(64, 64, 128, 4, 4, 3))


@pytest.mark.parametrize("m,n,k,config", CASES)
def test_fast_accumulation_stays_close(m: int, n: int, k: int, config: GemmConfig) -> None:
    """fast_accum=True (no float32 promotion per K tile, engine.layers.quant.fp8.FAST_ACCUM): the MMA's own
    accumulator over the whole K loop; relative error in norm under 2**-7, as for the promoted sums above."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    xq, xs = quantize(x)
    wq, ws = quantize(w)
    exact = (xq.float() @ wq.float().t()) * xs * ws.view(1, -1)
    got = fp8_gemm(xq.to(DEVICE), xs.to(DEVICE), wq.to(DEVICE), ws.view(-1).to(DEVICE), config,
                   fast_accum=True).float().cpu()
    assert (got - exact).norm() <= 2**-7 * exact.norm()
