"""Batch metadata for one forward pass, set by the model runner and read only by the
attention layers and the LM head, so that model forward(input_ids, positions) stays clean."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V goes; -1 = padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: offsets of each sequence's tokens
    logits_indices: torch.Tensor  # [num_sampled] int64: tokens whose logits are needed
    max_query_len: int  # host-side copies so kernels never sync the device
    max_seq_len: int
    is_decode: bool  # every sequence has exactly one new token (CUDA-graph eligible)
    # prefill steps: host copies of query_start_loc and seq_lens, so a long chunk can take its own kernel
    query_start_loc_host: list[int] | None = None
    seq_lens_host: list[int] | None = None


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    assert _CONTEXT is not None, "forward pass outside forward_context()"
    return _CONTEXT


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _CONTEXT
    previous, _CONTEXT = _CONTEXT, ctx
    try:
        yield
    finally:
        _CONTEXT = previous
