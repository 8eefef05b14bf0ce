"""FP8 KV pages (float8_e4m3fn, per-layer k_scale / v_scale) and per-token FP8 activation quantization:
Triton (interpreter on CPU, GPU where present) against gantry_kernels/reference.py on fresh random inputs."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from engine.layers.quant.fp8 import per_token_quant_torch
from gantry_kernels import reference
from gantry_kernels.decode_attention import decode_attention
from gantry_kernels.fp8_quant import per_token_quant
from gantry_kernels.kv_store import store_kvcache
from gantry_kernels.prefill_attention import prefill_attention

FP8 = torch.float8_e4m3fn
Check = Callable[[torch.Tensor, torch.Tensor], None]


def assert_fp8_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-equal FP8 on a GPU. Triton 3.9's interpreter rounds a value that carries into the next
    power of two (31.9 -> 32) without raising the exponent (16), and rounds some subnormals apart:
    there a few entries may be off by up to half their value."""
    same = got.view(torch.uint8) == want.view(torch.uint8)
    if got.is_cuda:
        assert same.all()
        return
    g, w = got.float()[~same], want.float()[~same]
    assert ((g - w).abs() <= w.abs() / 2 + 2**-6).all(), (g[:5], w[:5])  # 2**-6: e4m3's smallest normal
    assert (~same).float().mean() < 0.05


def _fp8_pages(make_paged_kv: Callable, seq_lens: list[int], num_kv_heads: int, head_dim: int,
               block_size: int) -> tuple[torch.Tensor, ...]:
    k, v, block_tables, lens = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, torch.float32)
    return (k * 40).to(FP8), (v * 40).to(FP8), block_tables, lens  # values up to ~+-160: exponents in use


@pytest.mark.parametrize("k_scale,v_scale", [(1.0, 1.0), (0.5, 3.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_fp8_matches_reference(device: torch.device, k_scale: float, v_scale: float, dtype: torch.dtype) -> None:
    num_tokens, num_kv_heads, head_dim, block_size = 29, 2, 64, 4
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, device=device).to(dtype) * 30
    qkv[0, 1, 0, :4] = torch.tensor([1e4, -1e4, 0.0, 1e-9])  # saturates at +-448 (e4m3fn has no inf), no NaN
    key, value = qkv[:, 1], qkv[:, 2]  # [num_tokens, num_kv_heads, head_dim], strided like the layer's
    num_blocks = 2 * -(-num_tokens // block_size) + 3
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    first = slots[0].item()
    slots[torch.rand(num_tokens, device=device) < 0.25] = -1
    slots[0] = first  # token 0 (the saturating values) is stored
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(FP8)
    v_cache = torch.randn(shape, device=device).to(FP8)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    reference.store_kvcache(key, value, k_ref, v_ref, slots, k_scale, v_scale)
    assert_fp8_equal(k_cache, k_ref)
    assert_fp8_equal(v_cache, v_ref)
    assert not k_cache.float().isnan().any()
    stored = k_ref.view(-1, num_kv_heads, head_dim)[first, 0, :2].float()
    assert stored.tolist() == [448.0, -448.0]
    # what the pages hold, times the scale, is the input within e4m3's 3 mantissa bits
    valid = slots >= 0
    back = reference.gather_kv(k_ref, torch.arange(num_blocks, device=device), num_blocks * block_size)
    got = back.float()[slots[valid].long()] * k_scale
    want = key[valid].float()
    ok = (got - want).abs() <= want.abs() * 2**-4 + 2**-9 * k_scale
    assert ok[1:].all() and ok[0, 1:].all()


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_fp8_matches_reference(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                                      num_splits: int, dtype: torch.dtype) -> None:
    k_cache, v_cache, block_tables, lens = _fp8_pages(make_paged_kv, [1, 17, 130, 33], 2, 64, 16)
    query = torch.randn(4, 8, 64, device=device).to(dtype)  # [num_seqs, num_heads, head_dim]
    k_scale, v_scale = 0.01, 0.5
    out = decode_attention(query, k_cache, v_cache, block_tables, lens, 0.125, num_splits=num_splits,
                           k_scale=k_scale, v_scale=v_scale)
    ref = reference.decode_attention(query, k_cache, v_cache, block_tables, lens, 0.125, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref)
    # the scales are applied: without them the answer is another one
    plain = reference.decode_attention(query, k_cache, v_cache, block_tables, lens, 0.125)
    assert (plain - ref).abs().max() > 1.0


@pytest.mark.parametrize("f16_dot", [pytest.param(False, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Triton's interpreter computes bf16 dots wrongly")), True])
def test_decode_fp8_bf16_query_either_widening(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                                               f16_dot: bool) -> None:
    """A bf16 query over FP8 pages: the pages widen to bf16, or to fp16 with the query narrowed to fp16."""
    k_cache, v_cache, block_tables, lens = _fp8_pages(make_paged_kv, [1, 17, 130, 33], 2, 64, 16)
    query = torch.randn(4, 8, 64, device=device).to(torch.bfloat16)
    out = decode_attention(query, k_cache, v_cache, block_tables, lens, 0.125, k_scale=0.01, v_scale=0.5,
                           f16_dot=f16_dot)
    ref = reference.decode_attention(query, k_cache, v_cache, block_tables, lens, 0.125, k_scale=0.01, v_scale=0.5)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_fp8_matches_reference(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                                       dtype: torch.dtype) -> None:
    scenario = [(1, 50), (0, 9), (25, 0), (12, 64), (40, 3)]  # (q_len, earlier context): mixed batch
    q_lens = [q for q, _ in scenario]
    k_cache, v_cache, block_tables, lens = _fp8_pages(make_paged_kv, [q + c for q, c in scenario], 2, 32, 16)
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    query = torch.randn(sum(q_lens), 4, 32, device=device).to(dtype)  # [num_tokens, num_heads, head_dim]
    k_scale, v_scale = 0.02, 2.0
    out = prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, 32**-0.5,
                            k_scale=k_scale, v_scale=v_scale)
    ref = reference.paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, 32**-0.5,
                                    k_scale=k_scale, v_scale=v_scale)
    assert_close(out, ref)


def test_fp8_pages_close_to_full_precision(make_paged_kv: Callable, device: torch.device) -> None:
    """Store through FP8 with a per-layer scale, attend: close to attention over the float32 values."""
    k, v, block_tables, lens = make_paged_kv([40, 90], 2, 32, 16, torch.float32)
    k_scale, v_scale = 4.0 / 448, 4.0 / 448  # randn stays within +-4: the range e4m3 covers
    k8, v8 = (k / k_scale).clamp(-448, 448).to(FP8), (v / v_scale).clamp(-448, 448).to(FP8)
    query = torch.randn(2, 4, 32, device=device)
    ref = reference.decode_attention(query, k, v, block_tables, lens, 32**-0.5)
    out = decode_attention(query, k8, v8, block_tables, lens, 32**-0.5, k_scale=k_scale, v_scale=v_scale)
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


@pytest.mark.parametrize("shape", [(5, 64), (3, 1500), (1, 3584)])
def test_per_token_quant_matches_torch(device: torch.device, shape: tuple[int, int]) -> None:
    x = torch.randn(shape, device=device) * torch.logspace(-3, 2, shape[0], device=device)[:, None]
    x[0, :3] = 0.0
    q, scale = per_token_quant(x)
    q_ref, scale_ref = per_token_quant_torch(x)
    assert q.dtype == FP8 and scale.shape == (shape[0], 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert_fp8_equal(q, q_ref)
    assert q.float().abs().amax(dim=1).eq(448.0).all()  # each token's largest value maps to the top of e4m3


def test_per_token_quant_zero_rows(device: torch.device) -> None:
    q, scale = per_token_quant(torch.zeros(3, 40, device=device))
    assert not q.float().isnan().any() and q.float().eq(0).all() and scale.gt(0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(28, 4, 128), (40, 8, 128), (14, 2, 64)])
def test_fp8_pages_bf16_gpu(make_paged_kv: Callable, assert_close: Check, num_heads: int, num_kv_heads: int,
                            head_dim: int) -> None:
    """The engine's case on a GPU: bf16 queries over FP8 pages, decode and a mixed prefill batch."""
    device = torch.device("cuda")
    seq_lens = torch.randint(1, 3000, (9,)).tolist() + [1, 4097]
    k_cache, v_cache, block_tables, lens = _fp8_pages(make_paged_kv, seq_lens, num_kv_heads, head_dim, 16)
    k_scale, v_scale = 0.03, 0.01
    query = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(torch.bfloat16)
    out = decode_attention(query, k_cache, v_cache, block_tables, lens, head_dim**-0.5, k_scale=k_scale, v_scale=v_scale)
    assert_close(out, reference.decode_attention(query, k_cache, v_cache, block_tables, lens, head_dim**-0.5,
                                                 k_scale=k_scale, v_scale=v_scale))
    q_lens = [min(n, 300) for n in seq_lens]
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    query = torch.randn(sum(q_lens), num_heads, head_dim, device=device).to(torch.bfloat16)
    out = prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, head_dim**-0.5,
                            k_scale=k_scale, v_scale=v_scale)
    assert_close(out, reference.paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens,
                                                head_dim**-0.5, k_scale=k_scale, v_scale=v_scale))
