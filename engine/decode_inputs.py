"""The host inputs of a step where every request decodes one token, built with a few list
comprehensions and numpy over the batch instead of per-request appends (ModelRunner.prepare_inputs'
common case: at batch 256 this loop is a large part of a decode step's host time)."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from engine.model_runner import RunnerRequestState


def decode_inputs(states: list[RunnerRequestState], req_ids: list[str], block_table_cpu: np.ndarray,
                  block_size: int, placeholder: int, last_sampled_row: Callable[[list[str]], list[int] | np.ndarray]
                  ) -> dict[str, np.ndarray | list[str] | int | None]:
    """One token per state, at its num_computed_tokens (advanced here by one). last_sampled_row(ids):
    each id's row in the previous step's sampled tokens (its placeholder's value)."""
    n = len(states)
    pos = np.array([s.num_computed_tokens for s in states], dtype=np.int64)  # [n]
    input_ids = np.array([s.token_ids[p] for s, p in zip(states, pos.tolist())], dtype=np.int64)  # [n]
    rows = np.array([s.row for s in states], dtype=np.int64)
    max_blocks = max([len(s.block_ids) for s in states])
    slots = block_table_cpu[rows, pos // block_size].astype(np.int64) * block_size + pos % block_size  # [n]
    seq_lens = pos + 1
    for s, end in zip(states, seq_lens.tolist()):
        s.num_computed_tokens = end
    sampled = seq_lens == np.array([len(s.token_ids) for s in states], dtype=np.int64)  # the newest token
    if sampled.all():
        logits_indices, sampled_ids = np.arange(n, dtype=np.int64), req_ids
    else:
        logits_indices = np.flatnonzero(sampled)
        sampled_ids = [req_ids[i] for i in logits_indices.tolist()]
    feed_dst = np.flatnonzero(input_ids == placeholder)  # only the newest token can be one
    feed_src = None
    if len(feed_dst):
        feed_src = np.asarray(last_sampled_row([req_ids[i] for i in feed_dst.tolist()]), dtype=np.int64)
    return {"input_ids": input_ids, "positions": pos, "slots": slots, "block_tables": block_table_cpu[rows, :max_blocks],
            "seq_lens": seq_lens.astype(np.int32), "query_start_loc": np.arange(n + 1, dtype=np.int32),
            "logits_indices": logits_indices, "sampled_ids": sampled_ids, "max_seq_len": int(seq_lens.max()),
            "feed_dst": feed_dst if feed_src is not None else None, "feed_src": feed_src}
