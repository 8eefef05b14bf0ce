"""paged_attention with reference.py's semantics: the decode kernel when every q_len is 1, else prefill;
a sequence with a long chunk deep in its context (cudnn_prefill.is_long_chunk) takes cuDNN's attention
(gantry_kernels/cudnn_prefill.py) when the host-side offsets are given and the pages allow it, the other sequences
around it these kernels.

Pass the host-side max_query_len (and max_seq_len) the scheduler already knows, so that choosing a
kernel never syncs the GPU.
"""
from __future__ import annotations

import torch

from gantry_kernels.cudnn_prefill import can_use_cudnn, chunk_attention, is_long_chunk, may_hold_long_chunk
from gantry_kernels.decode_attention import decode_attention
from gantry_kernels.prefill_attention import prefill_attention


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], new tokens of every sequence, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], new tokens already stored
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32, offsets of each sequence's tokens in query
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including the new tokens
    scale: float,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    k_scale: float = 1.0,  # FP8 pages: a page holds key / k_scale, value / v_scale
    v_scale: float = 1.0,
    query_start_loc_host: list[int] | None = None,  # host copies of query_start_loc and seq_lens (prefill steps)
    seq_lens_host: list[int] | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    if (query_start_loc_host is not None and seq_lens_host is not None and max_query_len is not None
            and max_seq_len is not None and may_hold_long_chunk(max_query_len, max_seq_len)
            and can_use_cudnn(query.dtype, k_cache, k_scale, v_scale)):
        return _with_long_chunks(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                 query_start_loc_host, seq_lens_host)
    num_seqs = seq_lens.shape[0]
    if query.shape[0] == num_seqs and num_seqs > 0:
        if max_query_len is None:  # one host sync; callers on the hot path pass it
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        if max_query_len == 1:  # num_seqs tokens, none over 1: exactly one each
            return decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=max_seq_len,
                                    k_scale=k_scale, v_scale=v_scale)
    return prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                             k_scale=k_scale, v_scale=v_scale, max_query_len=max_query_len, max_seq_len=max_seq_len)


def _with_long_chunks(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, loc: list[int], lens: list[int],
) -> torch.Tensor:
    """Each long chunk through cuDNN; each run of other sequences between them through the kernels above."""
    out = torch.empty_like(query)
    first = 0  # the first sequence of the current run of short ones

    def short_run(end: int) -> None:  # sequences [first, end) through the Triton kernels
        if end == first or loc[end] == loc[first]:
            return
        a, b = loc[first], loc[end]
        # slices copied: Triton compiles a variant per pointer alignment (16 bytes or not), and a row or an
        # int32 past the first is seldom aligned; a compile is seconds mid-serve
        out[a:b] = paged_attention(
            query[a:b], k_cache, v_cache, block_tables[first:end].clone(), query_start_loc[first : end + 1] - a,
            seq_lens[first:end].clone(), scale, max_query_len=max(loc[i + 1] - loc[i] for i in range(first, end)),
            max_seq_len=max(lens[first:end]))

    for i in range(len(lens)):
        if is_long_chunk(loc[i + 1] - loc[i], lens[i], query.shape[1], query.shape[2]):
            short_run(i)
            chunk_attention(query[loc[i] : loc[i + 1]], k_cache, v_cache, block_tables[i : i + 1],
                            query_start_loc[i : i + 2] - loc[i], seq_lens[i : i + 1], lens[i], scale,
                            out[loc[i] : loc[i + 1]])
            first = i + 1
    short_run(len(lens))
    return out
