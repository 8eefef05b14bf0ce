"""A long prefill chunk's attention through cuDNN's fused attention (one of torch's SDPA backends).

Our Triton kernel reads the pages at ~55% of the H200's matmul rate; cuDNN's flash kernel runs at ~87%
on contiguous K/V. For a chunk of CUDNN_MIN_QUERY or more new tokens the K/V of the whole sequence is
gathered out of the pages (0.13 ms at 112K tokens, 4 KV heads, against ~22 ms of attention) and the
chunk attends in two cuDNN calls whose log-sum-exps are merged:
  - the context before the chunk, which every new token sees whole: no mask, so the G query heads of a
    KV head stack along the rows ([1, num_kv_heads, G * n, D]) and read each K/V tile once;
  - the chunk's own tokens, causal (square, so top-left and bottom-right alignment agree), KV heads
    repeated to the query heads.
H200, 8,192 new tokens 112K deep (benchmarks/kernel_bench.py --long): Triton 377 TFLOP/s, this path ~600.
bf16/fp16 pages only (FP8 pages and fp32 take the Triton kernel), head sizes cuDNN supports.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

CUDNN_MIN_QUERY = 1024  # new tokens of one sequence from which its chunk takes this path


@functools.cache
def _cudnn_supports(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """torch's own check of cuDNN attention for this dtype, head size and GPU (cached: shapes only)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not torch.backends.cudnn.is_available():
        return False
    q = torch.empty(1, 1, 128, head_dim, dtype=dtype, device=device)
    params = torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, False, False)
    return bool(torch.backends.cuda.can_use_cudnn_attention(params, False))


def can_use_cudnn(query: torch.Tensor, k_cache: torch.Tensor, k_scale: float, v_scale: float) -> bool:
    return (k_cache.dtype == query.dtype and k_scale == 1.0 and v_scale == 1.0
            and _cudnn_supports(query.dtype, query.shape[-1], query.device))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, h, n, D], k/v [1, h, m, D] (any strides, last dim contiguous) -> (o [1, h, n, D], lse [1, h, n, 1]
    natural-log float32)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return out[0], out[1]


def chunk_attention(
    query: torch.Tensor,  # [n, num_heads, D]: one sequence's new tokens
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, D], the chunk already stored
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [>= blocks of seq_len] int32: this sequence's pages
    seq_len: int,  # host: context including the chunk
    scale: float,
    out: torch.Tensor,  # [n, num_heads, D], written
) -> None:
    n, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group, before = num_heads // num_kv_heads, seq_len - n
    pages = block_table[: -(-seq_len // block_size)]
    k = k_cache.index_select(0, pages).view(-1, num_kv_heads, head_dim)  # [pages * block_size, kv_heads, D]
    v = v_cache.index_select(0, pages).view(-1, num_kv_heads, head_dim)
    # the chunk on itself, causal: [1, num_heads, n, D] views of q; K/V heads repeated
    k_new = k[before:seq_len].repeat_interleave(group, dim=1).transpose(0, 1)[None]
    v_new = v[before:seq_len].repeat_interleave(group, dim=1).transpose(0, 1)[None]
    o_new, lse_new = _sdpa(query.transpose(0, 1)[None], k_new, v_new, True, scale)
    if before == 0:
        out.copy_(o_new[0].transpose(0, 1))
        return
    # the context before it, no mask: [1, kv_heads, group * n, D], rows (head in group, token)
    q_packed = query.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * n, head_dim)
    o_old, lse_old = _sdpa(q_packed, k[:before].transpose(0, 1)[None], v[:before].transpose(0, 1)[None], False, scale)
    # both are [num_heads, n, ...] once viewed: head = kv_head * group + head in group
    merge_two(o_old.view(num_heads, n, head_dim), lse_old.reshape(num_heads, n),
              o_new[0], lse_new.reshape(num_heads, n), out)


@triton.jit
def _merge_two_kernel(
    o1_ptr, lse1_ptr, o2_ptr, lse2_ptr, out_ptr,
    stride_o1_h, stride_o1_t, stride_lse1_h, stride_o2_h, stride_o2_t, stride_lse2_h, stride_out_t, stride_out_h,
    HEAD_DIM: tl.constexpr,
):
    """out[t, h] = softmax-weighted sum of two partial attentions by their log-sum-exps."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    lse1 = tl.load(lse1_ptr + h * stride_lse1_h + t)
    lse2 = tl.load(lse2_ptr + h * stride_lse2_h + t)
    m = tl.maximum(lse1, lse2)
    w1 = tl.exp(lse1 - m)
    w2 = tl.exp(lse2 - m)
    o1 = tl.load(o1_ptr + h * stride_o1_h + t * stride_o1_t + dims).to(tl.float32)
    o2 = tl.load(o2_ptr + h * stride_o2_h + t * stride_o2_t + dims).to(tl.float32)
    o = (o1 * w1 + o2 * w2) / (w1 + w2)
    tl.store(out_ptr + t * stride_out_t + h * stride_out_h + dims, o.to(out_ptr.dtype.element_ty))


def merge_two(
    o1: torch.Tensor,  # [num_heads, n, D], last dim contiguous
    lse1: torch.Tensor,  # [num_heads, n] float32, tokens contiguous
    o2: torch.Tensor,
    lse2: torch.Tensor,
    out: torch.Tensor,  # [n, num_heads, D]
) -> None:
    num_heads, n, head_dim = o1.shape
    assert o1.stride(2) == 1 and o2.stride(2) == 1 and out.stride(2) == 1 and lse1.stride(1) == 1 and lse2.stride(1) == 1
    _merge_two_kernel[(n, num_heads)](
        o1, lse1, o2, lse2, out,
        o1.stride(0), o1.stride(1), lse1.stride(0), o2.stride(0), o2.stride(1), lse2.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=head_dim,
    )
