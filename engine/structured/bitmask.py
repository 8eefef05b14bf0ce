"""One step's grammar bitmask on the model runner's side: the rows of the requests it samples,
applied to the logits on their device (xgrammar's kernel: CUDA on a GPU, its C++ loop on CPU)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def sampled_bitmask(bitmask: torch.Tensor | None, bitmask_req_ids: list[str], sampled_ids: list[str],
                    vocab_size: int, to_device: Callable[[torch.Tensor, torch.dtype], torch.Tensor],
                    ) -> tuple[torch.Tensor, list[int]] | tuple[None, None]:
    """The bitmask rows of the constrained requests among this step's sampled ones, as a
    [len(sampled_ids), ceil(vocab_size / 32)] int32 tensor on the device (other rows allow everything;
    ids past the grammar's vocabulary are never allowed in constrained rows), and the rows it
    constrains; (None, None) when none of them is constrained.

    bitmask: [len(bitmask_req_ids), ceil(grammar vocab / 32)] int32 from the scheduler (host); the
    grammar's vocabulary is the tokenizer's, at most the model's vocab_size (the logits' width)."""
    if bitmask is None:
        return None, None
    row_of = {req_id: row for row, req_id in enumerate(sampled_ids)}
    src, rows = [], []
    for k, req_id in enumerate(bitmask_req_ids):
        row = row_of.get(req_id)
        if row is not None:  # a prefill chunk that ends mid-prompt samples nothing
            src.append(k)
            rows.append(row)
    if not rows:
        return None, None
    host = bitmask if len(src) == bitmask.shape[0] else bitmask[src]  # in order: no gather
    constrained = to_device(host, torch.int32)  # [len(rows), grammar words]
    words = (vocab_size + 31) // 32
    if constrained.shape[1] < words:  # the padding rows of the model's vocabulary: never allowed
        constrained = torch.nn.functional.pad(constrained, (0, words - constrained.shape[1]), value=0)
    if rows == list(range(len(sampled_ids))):  # every sampled row constrained, in order
        return constrained, rows
    # index_copy_, not an indexed assignment: index_put_ waited for the device (a sync per step that
    # stalled the engine loop until the step's forward had finished)
    full = torch.full((len(sampled_ids), words), -1, dtype=torch.int32, device=constrained.device)
    full.index_copy_(0, to_device(rows, torch.long), constrained)
    return full, rows


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """logits: [num_reqs, vocab] float32, in place: tokens the grammar forbids become -inf in `rows`."""
    import xgrammar as xgr  # only batches with a constrained request get here

    # On a GPU every row: the others are all ones, and a list of indices would be a pageable host copy
    # in the sampler, which the engine core queues while the step's forward still runs
    indices = None if logits.is_cuda else rows
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1], indices=indices)
