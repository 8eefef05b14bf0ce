"""The adapters of one forward pass (punica's per-token slot index) and the shrink/expand
dispatch: on CUDA Triton SGMV over the tokens grouped by adapter (decode and prefill alike: one
tile of an adapter's tokens per program reads its weights once), the torch reference elsewhere.
None as the batch means no adapter in it: linear layers then skip LoRA entirely."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gantry_kernels import reference


@dataclass
class LoRABatch:
    token_slots: torch.Tensor | None  # [>= num_tokens] int32: each token's slot, -1 = no adapter (torch, augmented K)
    # Triton path (punica's SGMV over tokens grouped by adapter; static buffers under CUDA graphs):
    perm: torch.Tensor | None  # [>= num_tokens] int32: rows of the tokens with an adapter, grouped by slot
    seg_start: torch.Tensor | None  # [num_tiles + 1] int32: tile j's rows are perm[seg_start[j]:seg_start[j + 1]]
    seg_slot: torch.Tensor | None  # [num_tiles] int32: each tile's slot (one adapter per tile), -1 = unused
    max_seg_len: int | None  # host-side bound on a tile's tokens; None: the batch's token count
    use_triton: bool  # CUDA: Triton kernels; else the torch reference
    # [>= num_tokens, sum of the SGMV layers' num_slices * rank] float32, zeroed once for the step (decode, CUDA
    # graphs' static buffer): every shrink adds into its own columns instead of a torch.zeros of its own
    shrink_out: torch.Tensor | None = None


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


def shrink_split_k(in_features: int, num_tokens: int) -> tuple[int, int]:
    """(programs sharing one tile's K, BLOCK_K): N is only the rank, so a long K alone would leave SMs
    idle. A decode batch has few tiles: K // 128 splits of 64 columns (H200 sweep at W1, 256 tokens:
    4.5x faster than one program per tile, 10-20% faster than K // 256 splits of 32); a prefill has
    tiles enough for fewer splits."""
    if num_tokens <= 256:
        return max(1, min(32, in_features // 128)), 64
    return max(1, min(32, in_features // 256)), 32


def _tile(batch: LoRABatch, num_tokens: int) -> tuple[int, int]:
    """(longest segment, tokens per tile): a decode step's adapter holds a few dozen tokens (32 measured
    best on an H200), a prefill segment up to thousands."""
    if batch.max_seg_len is None:  # decode (CUDA graphs): any segment may hold the whole batch
        return num_tokens, 32
    return batch.max_seg_len, min(64, max(16, 1 << (batch.max_seg_len - 1).bit_length()))


def shrink(batch: LoRABatch, x: torch.Tensor, a_stack: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [num_tokens, in] @ A[slot]^T per token -> [num_tokens, rank] float32 (0 without an adapter); out, when
    given, is a zeroed float32 [num_tokens, rank] view (rows may be strided) the Triton path adds into."""
    if not batch.use_triton:
        return reference.lora_shrink(x, a_stack, batch.token_slots)
    from gantry_kernels.lora import sgmv

    if out is None:
        out = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=x.device)
    split_k, block_k = shrink_split_k(x.shape[1], x.shape[0])
    msl, bm = _tile(batch, x.shape[0])
    sgmv(x, a_stack, out, batch.seg_start, batch.seg_slot, msl, add=True, perm=batch.perm, split_k=split_k,
         block_m=bm, block_k=block_k)
    return out


def expand(batch: LoRABatch, t: torch.Tensor, b_stack: torch.Tensor, y: torch.Tensor, offset: int) -> None:
    """y[:, offset:offset + out] += t [num_tokens, rank] @ B[slot]^T per token, in place."""
    if not batch.use_triton:
        reference.lora_expand(t, b_stack, batch.token_slots, y, offset)
        return
    from gantry_kernels.lora import sgmv

    msl, bm = _tile(batch, t.shape[0])
    sgmv(t, b_stack, y, batch.seg_start, batch.seg_slot, msl, offset, add=True, perm=batch.perm, block_m=bm)


def expand_fused(batch: LoRABatch, t: torch.Tensor, b_all: torch.Tensor, y: torch.Tensor, x_col: torch.Tensor,
                 block_n: int) -> None:
    """Every slice's expand in one launch (Triton only): y [num_tokens, out] += each slice's rank columns of t
    [num_tokens, num_slices * rank] @ its rows of b_all [max_loras, out, rank]^T; x_col: each output tile's
    first column of t."""
    from gantry_kernels.lora import sgmv

    msl, bm = _tile(batch, t.shape[0])
    sgmv(t, b_all, y, batch.seg_start, batch.seg_slot, msl, 0, add=True, perm=batch.perm, block_m=bm,
         block_n=block_n, x_col=x_col)
