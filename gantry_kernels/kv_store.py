"""Triton KV store: write each new token's key and value into its page slot.

A token's slot is block_id * block_size + offset (see reference.py); slot -1 marks padding and is skipped.
FP8 pages (float8_e4m3fn) hold value / scale, saturated to +-448 (one k_scale and v_scale per layer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gantry_kernels.pdl import launch_kwargs, wait_prior


@triton.jit
def _store_kvcache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    slot_mapping_ptr,  # [num_tokens]
    stride_key_t,
    stride_key_h,
    stride_value_t,
    stride_value_h,
    stride_kc_slot,  # k_cache stride of one slot (block_size consecutive slots form a page)
    stride_kc_h,
    stride_vc_slot,
    stride_vc_h,
    inv_k_scale,  # 1 / k_scale, used for FP8 pages
    inv_v_scale,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_P2: tl.constexpr,
    DIM_P2: tl.constexpr,
    FP8: tl.constexpr,  # the pages are float8_e4m3fn
    PDL: tl.constexpr,
):
    wait_prior(PDL)  # gantry_kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_P2)
    dims = tl.arange(0, DIM_P2)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    if slot < 0:  # padding
        return
    src_k = key_ptr + token.to(tl.int64) * stride_key_t + heads[:, None] * stride_key_h + dims[None, :]
    src_v = value_ptr + token.to(tl.int64) * stride_value_t + heads[:, None] * stride_value_h + dims[None, :]
    dst_k = k_cache_ptr + slot * stride_kc_slot + heads[:, None] * stride_kc_h + dims[None, :]
    dst_v = v_cache_ptr + slot * stride_vc_slot + heads[:, None] * stride_vc_h + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    if FP8:
        k = tl.clamp(k.to(tl.float32) * inv_k_scale, -448.0, 448.0)
        v = tl.clamp(v.to(tl.float32) * inv_v_scale, -448.0, 448.0)
    tl.store(dst_k, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_v, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int; -1: do not store (padding)
    k_scale: float = 1.0,  # FP8 pages: the stored value is key / k_scale
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and k_cache.shape == v_cache.shape
    assert k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert key.stride(2) == 1 and value.stride(2) == 1
    # A slot indexes [num_blocks * block_size]: the first two cache dims must flatten.
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1) and k_cache.stride(3) == 1
    assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1) and v_cache.stride(3) == 1
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        1.0 / k_scale, 1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_P2=triton.next_power_of_2(num_kv_heads),
        DIM_P2=triton.next_power_of_2(head_dim),
        FP8=k_cache.dtype == torch.float8_e4m3fn,
        **launch_kwargs(key.device),
    )
