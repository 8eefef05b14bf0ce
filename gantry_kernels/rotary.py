"""Triton rotary embedding, NeoX style (the two halves of each head are the pairs), as HF Llama/Qwen do.

Returns new (query, key) like reference.py; rotary_dim must equal head_dim.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gantry_kernels.pdl import launch_kwargs, wait_prior


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, stride_src_head, stride_dst_head, cos, sin,
    NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HALF: tl.constexpr,
):
    """Rotate [NUM_HEADS, 2 * HALF] of one token: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    heads = tl.arange(0, HEADS_P2)
    dims = tl.arange(0, HALF)
    mask = heads[:, None] < NUM_HEADS
    src = src_ptr + heads[:, None] * stride_src_head + dims[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    out_dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    dst = dst_ptr + heads[:, None] * stride_dst_head + dims[None, :]
    tl.store(dst, (x1 * cos[None, :] - x2 * sin[None, :]).to(out_dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(out_dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens]
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    q_out_ptr,
    k_out_ptr,
    cos_sin_ptr,  # [max_position, head_dim] fp32: cos in the first half, sin in the second
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_qo_tok,
    stride_qo_head,
    stride_ko_tok,
    stride_ko_head,
    stride_cs,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_P2: tl.constexpr,
    KV_HEADS_P2: tl.constexpr,
    HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_prior(PDL)  # gantry_kernels/pdl.py: no-op unless launched with PDL (sm_90+, GANTRY_PDL not 0)
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + dims).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + dims).to(tl.float32)
    _rotate_heads(q_ptr + tok * stride_q_tok, q_out_ptr + tok * stride_qo_tok, stride_q_head, stride_qo_head,
                  cos, sin, NUM_HEADS, HEADS_P2, HALF)
    _rotate_heads(k_ptr + tok * stride_k_tok, k_out_ptr + tok * stride_ko_tok, stride_k_head, stride_ko_head,
                  cos, sin, NUM_KV_HEADS, KV_HEADS_P2, HALF)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens]
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    cos_sin_cache: torch.Tensor,  # [max_position, head_dim] fp32: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    assert cos_sin_cache.shape[1] == head_dim, "rotary_dim must equal head_dim"
    assert head_dim % 2 == 0 and (head_dim // 2) == triton.next_power_of_2(head_dim // 2)
    assert query.stride(2) == 1 and key.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    q_out = torch.empty_like(query, memory_format=torch.contiguous_format)
    k_out = torch.empty_like(key, memory_format=torch.contiguous_format)
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            positions, query, key, q_out, k_out, cos_sin_cache,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0),
            NUM_HEADS=num_heads,
            NUM_KV_HEADS=num_kv_heads,
            HEADS_P2=triton.next_power_of_2(num_heads),
            KV_HEADS_P2=triton.next_power_of_2(num_kv_heads),
            HALF=head_dim // 2,
            **launch_kwargs(query.device),
        )
    return q_out, k_out
