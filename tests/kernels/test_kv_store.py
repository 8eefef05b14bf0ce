"""store_kvcache: Triton against reference, padding slots (-1) skipped, strided (qkv-split) inputs."""
from __future__ import annotations

import pytest
import torch

from gantry_kernels import reference
from gantry_kernels.kv_store import store_kvcache


def _check(device: torch.device, num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int,
           dtype: torch.dtype, cache_dtype: torch.dtype) -> None:
    num_blocks = 2 * (-(-num_tokens // block_size)) + 3
    # key/value as views into one fused qkv row, as the attention layer hands them over
    qkv = torch.randn(num_tokens, 3, num_kv_heads, head_dim, device=device).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]  # [num_tokens, num_kv_heads, head_dim], non-contiguous
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[torch.rand(num_tokens, device=device) < 0.25] = -1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device).to(cache_dtype)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kvcache(key, value, k_cache, v_cache, slots)
    reference.store_kvcache(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 32), (3, 64), (2, 48)])
def test_store_kvcache(device: torch.device, block_size: int, num_kv_heads: int, head_dim: int) -> None:
    _check(device, 37, num_kv_heads, head_dim, block_size, torch.float32, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_store_kvcache_half(device: torch.device, dtype: torch.dtype) -> None:
    _check(device, 21, 2, 64, 16, dtype, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32, 256])
def test_store_kvcache_gpu(dtype: torch.dtype, block_size: int) -> None:
    _check(torch.device("cuda"), 4099, 8, 128, block_size, dtype, dtype)
