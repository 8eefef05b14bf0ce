"""A long prefill chunk's attention through cuDNN's fused attention (one of torch's SDPA backends).

Our Triton kernel reads the pages at ~55% of the H200's matmul rate; cuDNN's flash kernel runs at ~87%
on contiguous K/V. For a chunk of CUDNN_MIN_QUERY or more new tokens at least KEY_PIECE deep, the keys
before the chunk are gathered out of the pages in whole pieces of KEY_PIECE tokens (0.13 ms for 112K
tokens of 4 KV heads, against ~22 ms of attention), and each piece is one unmasked cuDNN call with a KV
head's query heads stacked on the rows ([1, num_kv_heads, G * n, D]: each K/V tile read once). The
Triton kernel takes the rest (the last partial piece and the chunk on itself, causal) as split partials;
one merge by log-sum-exp ends it. cuDNN builds an execution plan per shape (~75 ms on the H200, a stall
mid-serve), so the shapes are few and built at start (warmup): the piece is fixed and the chunk's rows
are padded to a ladder of eight sizes per octave (at most 12.5% more rows).
bf16/fp16 pages only (FP8 pages and fp32 take the Triton kernel), head sizes cuDNN supports.
"""
from __future__ import annotations

import functools

import torch
import triton

from kernels.decode_attention import merge_splits, split_partials
from kernels.prefill_attention import LOG2E, MAX_PREFILL_SPLITS, choose_prefill_splits, prefill_attention

CUDNN_MIN_QUERY = 512  # new tokens of one sequence from which its chunk takes this path
KEY_PIECE = 16384  # keys per cuDNN call: a chunk less deep than this stays on the Triton kernel
MAX_PARTIAL_BYTES = 3 * 2**30  # a chunk's partials at most (the rest's splits counted at their most)


@functools.cache
def _cudnn_supports(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """torch's own check of cuDNN attention for this dtype, head size and GPU (cached: shapes only)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not torch.backends.cudnn.is_available():
        return False
    q = torch.empty(1, 1, 128, head_dim, dtype=dtype, device=device)
    params = torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, False, False)
    return bool(torch.backends.cuda.can_use_cudnn_attention(params, False))


def can_use_cudnn(dtype: torch.dtype, k_cache: torch.Tensor, k_scale: float, v_scale: float) -> bool:
    """Queries of dtype over these pages can take this path: unscaled pages of the same dtype, a head size
    and GPU cuDNN supports."""
    return (k_cache.dtype == dtype and k_scale == 1.0 and v_scale == 1.0
            and _cudnn_supports(dtype, k_cache.shape[-1], k_cache.device))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked: q [1, h, n, D], k/v [1, h, m, D] (any strides, last dim contiguous) -> (o [1, h, n, D],
    lse [1, h, n, 1] natural-log float32)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    return out[0], out[1]


def is_long_chunk(q_len: int, seq_len: int, num_heads: int, head_dim: int) -> bool:
    """Whether a chunk takes this path: CUDNN_MIN_QUERY new tokens or more, at least KEY_PIECE deep, and its
    float32 partials (one per piece, plus the Triton rest's) within MAX_PARTIAL_BYTES (0.9 GB for 8,192 new
    tokens 112K deep at Qwen2-7B's 28 heads; contexts far past 128K fall back to the Triton kernel)."""
    splits = (seq_len - q_len) // KEY_PIECE + MAX_PREFILL_SPLITS
    return (q_len >= CUDNN_MIN_QUERY and seq_len - q_len >= KEY_PIECE
            and q_len * num_heads * splits * (head_dim + 2) * 4 <= MAX_PARTIAL_BYTES)


def may_hold_long_chunk(max_query_len: int, max_seq_len: int) -> bool:
    """A step's host-side bounds allow a long chunk in it (each sequence is then checked)."""
    return max_query_len >= CUDNN_MIN_QUERY and max_seq_len >= CUDNN_MIN_QUERY + KEY_PIECE


def padded_rows(n: int) -> int:
    """n rounded up to the ladder 8, 9, ..., 15 x 2^k: at most 12.5% more, and few shapes."""
    step = max(1, 2 ** max(0, n.bit_length() - 4))  # an eighth of the octave n lies in
    return -(-n // step) * step


def _piece(kv: torch.Tensor, i: int) -> torch.Tensor:
    """[pieces, KEY_PIECE, num_kv_heads, D] -> piece i as [1, num_kv_heads, KEY_PIECE, D], strided: the layout
    (strides included) that warmup builds plans for."""
    return kv[i].transpose(0, 1)[None]


def chunk_attention(
    query: torch.Tensor,  # [n, num_heads, D]: one sequence's new tokens
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, D], the chunk already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [1, >= blocks of seq_len] int32: this sequence's pages
    query_start_loc: torch.Tensor,  # [2] int32: [0, n] (device)
    seq_lens: torch.Tensor,  # [1] int32: its context including the chunk (device)
    seq_len: int,  # the same on the host, at least KEY_PIECE + n
    scale: float,
    out: torch.Tensor,  # [n, num_heads, D], written
) -> None:
    n, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    pieces = (seq_len - n) // KEY_PIECE
    assert pieces > 0, "a chunk less than KEY_PIECE deep stays on the Triton kernel"
    base = pieces * KEY_PIECE  # keys [0, base) through cuDNN, [base, seq_len) through Triton
    rest_splits = choose_prefill_splits(triton.cdiv(n, 128) * num_heads, seq_len - base, n * num_heads * (head_dim + 2) * 4,
                                        query.device)
    num_splits = pieces + rest_splits
    part_m, part_l, part_acc = split_partials(n, num_heads, num_splits, head_dim, query.device)  # num_splits >= 2
    # the table's rest copied: a row past the first is seldom 16-byte aligned, and Triton compiles per alignment
    prefill_attention(query, k_cache, v_cache, block_tables[:, base // block_size :].clone(), query_start_loc,
                      seq_lens - base, scale,
                      max_query_len=n, max_seq_len=seq_len - base, num_splits=rest_splits,
                      partials=(part_m, part_l, part_acc, pieces))
    part_l[:, :, :pieces] = 1.0  # cuDNN's outputs come normalised, with their log-sum-exp
    # [pieces, KEY_PIECE, num_kv_heads, D] each
    k = k_cache.index_select(0, block_tables[0, : base // block_size]).view(pieces, KEY_PIECE, num_kv_heads, head_dim)
    v = v_cache.index_select(0, block_tables[0, : base // block_size]).view(pieces, KEY_PIECE, num_kv_heads, head_dim)
    rows = padded_rows(n)
    q = query.new_zeros(num_kv_heads, group, rows, head_dim)  # rows: (head in group, token), padded
    q[:, :, :n] = query.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    q = q.view(1, num_kv_heads, group * rows, head_dim)
    for i in range(pieces):
        o, lse = _sdpa(q, _piece(k, i), _piece(v, i), scale)
        # [num_heads, rows, ...] once viewed: head = kv_head * group + head in group
        part_acc[:, :, i] = o.view(num_heads, rows, head_dim)[:, :n].transpose(0, 1)
        part_m[:, :, i] = lse.view(num_heads, rows)[:, :n].t() * LOG2E
    merge_splits(out, part_m, part_l, part_acc, num_splits, max(MAX_PREFILL_SPLITS, num_splits))


def warmup(k_cache: torch.Tensor, num_heads: int, dtype: torch.dtype, k_scale: float, v_scale: float,
           max_query_len: int, max_model_len: int) -> None:
    """Build cuDNN's plan for every padded row count a chunk up to max_query_len may take over these pages
    (~75 ms each; cuDNN keys its plans by shapes and strides, so the pieces' layout is _piece's); nothing
    when no chunk can take the path."""
    if not can_use_cudnn(dtype, k_cache, k_scale, v_scale) or not may_hold_long_chunk(max_query_len, max_model_len):
        return
    _, _, num_kv_heads, head_dim = k_cache.shape
    device = k_cache.device
    k = _piece(torch.zeros(1, KEY_PIECE, num_kv_heads, head_dim, dtype=dtype, device=device), 0)
    sizes = sorted({padded_rows(n) for n in range(CUDNN_MIN_QUERY, max_query_len + 1)})
    for rows in sizes:
        q = torch.zeros(1, num_kv_heads, num_heads // num_kv_heads * rows, head_dim, dtype=dtype, device=device)
        _sdpa(q, k, k, head_dim**-0.5)
