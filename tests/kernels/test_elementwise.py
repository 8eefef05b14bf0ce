"""rms_norm, fused_add_rms_norm, rotary_embedding, silu_and_mul: Triton against reference."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gantry_kernels import reference
from gantry_kernels.activation import silu_and_mul
from gantry_kernels.norm import fused_add_rms_norm, rms_norm
from gantry_kernels.rotary import rotary_embedding

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
Check = Callable[[torch.Tensor, torch.Tensor], None]


def _cos_sin_cache(max_position: int, head_dim: int, device: torch.device) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)  # [max_position, head_dim]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96), (1, 1000)])
def test_rms_norm(device: torch.device, assert_close: Check, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (3 * torch.randn(shape, device=device)).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    out = rms_norm(x, weight, 1e-6)
    assert_close(out, reference.rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(device: torch.device, assert_close: Check, dtype: torch.dtype) -> None:
    x = torch.randn(9, 320, device=device).to(dtype)
    residual = (4 * torch.randn(9, 320, device=device)).to(dtype)
    weight = torch.randn(320, device=device).to(dtype)
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    ref_out, ref_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    if dtype == torch.bfloat16 and device.type == "cpu":
        assert_close(new_residual, ref_residual)  # the interpreter truncates to bf16 where GPUs round
    else:
        assert torch.equal(new_residual, ref_residual)
    assert_close(out, ref_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 32), (8, 2, 64), (7, 1, 128)])
def test_rotary_embedding(device: torch.device, assert_close: Check, dtype: torch.dtype,
                          num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    num_tokens = 11
    cache = _cos_sin_cache(4096, head_dim, device)
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    # q and k as views into one fused qkv projection, as the attention layer slices them
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    q_out, k_out = rotary_embedding(positions, q, k, cache)
    q_ref, k_ref = reference.rotary_embedding(positions, q, k, cache)
    assert_close(q_out, q_ref)
    assert_close(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 2 * 48), (2, 3, 2 * 1500)])
def test_silu_and_mul(device: torch.device, assert_close: Check, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = (2 * torch.randn(shape, device=device)).to(dtype)
    assert_close(silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_gpu_model_shapes(assert_close: Check, dtype: torch.dtype) -> None:
    """Qwen2-7B shapes: hidden 3584, 28/4 heads of 128, intermediate 18944, 2048 tokens."""
    device = torch.device("cuda")
    x = torch.randn(2048, 3584, device=device).to(dtype)
    residual = torch.randn(2048, 3584, device=device).to(dtype)
    weight = torch.randn(3584, device=device).to(dtype)
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(new_residual, ref_residual)
    assert_close(out, ref_out)
    assert_close(rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6))
    gate_up = torch.randn(2048, 2 * 18944, device=device).to(dtype)
    assert_close(silu_and_mul(gate_up), reference.silu_and_mul(gate_up))
    cache = _cos_sin_cache(32768, 128, device)
    positions = torch.randint(0, 32768, (2048,), device=device)
    q = torch.randn(2048, 28, 128, device=device).to(dtype)
    k = torch.randn(2048, 4, 128, device=device).to(dtype)
    for out_t, ref_t in zip(rotary_embedding(positions, q, k, cache), reference.rotary_embedding(positions, q, k, cache)):
        assert_close(out_t, ref_t)
