"""paged_attention with reference.py's semantics: the decode kernel when every q_len is 1, else prefill.

Pass the host-side max_query_len (and max_seq_len) the scheduler already knows, so that choosing a
kernel never syncs the GPU.
"""
from __future__ import annotations

import torch

from kernels.decode_attention import decode_attention
from kernels.prefill_attention import prefill_attention


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
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    num_seqs = seq_lens.shape[0]
    if query.shape[0] == num_seqs and num_seqs > 0:
        if max_query_len is None:  # one host sync; callers on the hot path pass it
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
        if max_query_len == 1:  # num_seqs tokens, none over 1: exactly one each
            return decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=max_seq_len,
                                    k_scale=k_scale, v_scale=v_scale)
    return prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                             k_scale=k_scale, v_scale=v_scale, max_query_len=max_query_len, max_seq_len=max_seq_len)
