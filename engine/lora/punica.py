"""The adapters of one forward pass (punica's per-token slot index) and the shrink/expand
dispatch: Triton SGMV for prefill, BGMV for decode on CUDA, the torch reference elsewhere.
None as the batch means no adapter in it: linear layers then skip LoRA entirely."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kernels import reference


@dataclass
class LoRABatch:
    token_slots: torch.Tensor  # [>= num_tokens] int32: each token's slot, -1 = no adapter (a static buffer under CUDA graphs)
    seg_start: torch.Tensor | None  # [num_segments + 1] int32: one segment per request (prefill path); None: decode
    seg_slot: torch.Tensor | None  # [num_segments] int32: each segment's slot, -1 = no adapter
    max_seg_len: int  # host-side: the longest segment (the SGMV grid)
    use_triton: bool  # CUDA: Triton kernels; else the torch reference


_BATCH: LoRABatch | None = None


def current_lora_batch() -> LoRABatch | None:
    return _BATCH


@contextlib.contextmanager
def lora_batch(batch: LoRABatch | None) -> Iterator[None]:
    global _BATCH
    previous, _BATCH = _BATCH, batch
    try:
        yield
    finally:
        _BATCH = previous


def shrink(batch: LoRABatch, x: torch.Tensor, a_stack: torch.Tensor) -> torch.Tensor:
    """x [num_tokens, in] @ A[slot]^T per token -> [num_tokens, rank] float32 (0 without an adapter)."""
    if not batch.use_triton:
        return reference.lora_shrink(x, a_stack, batch.token_slots)
    from kernels.lora import bgmv, sgmv

    out = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    if batch.seg_start is None:
        bgmv(x, a_stack, out, batch.token_slots)
    else:
        sgmv(x, a_stack, out, batch.seg_start, batch.seg_slot, batch.max_seg_len)
    return out


def expand(batch: LoRABatch, t: torch.Tensor, b_stack: torch.Tensor, y: torch.Tensor, offset: int) -> None:
    """y[:, offset:offset + out] += t [num_tokens, rank] @ B[slot]^T per token, in place."""
    if not batch.use_triton:
        reference.lora_expand(t, b_stack, batch.token_slots, y, offset)
        return
    from kernels.lora import bgmv, sgmv

    if batch.seg_start is None:
        bgmv(t, b_stack, y, batch.token_slots, offset, add=True)
    else:
        sgmv(t, b_stack, y, batch.seg_start, batch.seg_slot, batch.max_seg_len, offset, add=True)
