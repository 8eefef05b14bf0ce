"""LoRA slots of one linear layer: A and B of every resident adapter stacked per output slice
(q/k/v of qkv_proj, gate/up of gate_up_proj), sharded as the base layer is: column-parallel
layers split B on its output rows, row-parallel layers split A on its input columns (the
partial deltas are summed by the layer's all-reduce)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.lora.punica import LoRABatch, expand, expand_fused, shrink


@dataclass
class LoRASlice:
    module: str  # PEFT's module name (q_proj, ...)
    offset: int  # first column of the layer's local output
    size: int  # local output columns
    b_row_start: int  # first row of PEFT's full lora_B this rank holds (column-parallel)


def local_adapter_weights(slices: list[LoRASlice], weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          row_parallel: bool, in_start: int, in_local: int
                          ) -> Iterator[tuple[int, LoRASlice, torch.Tensor, torch.Tensor]]:
    """(slice index, slice, A [r, in_local], B [slice size, r]) for each slice the adapter has: this rank's
    shard (row-parallel: A's input columns; column-parallel: B's output rows)."""
    for i, s in enumerate(slices):
        if s.module not in weights:
            continue
        a, b = weights[s.module]
        if row_parallel:
            a = a[:, in_start : in_start + in_local]
        else:
            b = b[s.b_row_start : s.b_row_start + s.size]
        yield i, s, a, b


class LoRALinear:
    """Attached as `layer.lora`; apply() adds the batch's adapters' deltas to the layer's output."""

    augmented = False  # engine/lora/augmented.py's AugmentedLoRALinear puts the deltas in the layer's GEMM

    def __init__(self, slices: list[LoRASlice], in_local: int, in_start: int, row_parallel: bool, max_loras: int,
                 rank: int, dtype: torch.dtype, device: torch.device):
        self.slices, self.rank, self.row_parallel = slices, rank, row_parallel
        self.in_local, self.in_start = in_local, in_start  # this rank's input columns (row-parallel)
        self.shrink_col = 0  # first column of this layer's shrink output in the step's LoRABatch.shrink_out
        # [max_loras, num_slices * rank, in_local]: one shrink for every slice at once
        self.a_stack = torch.zeros(max_loras, len(slices) * rank, in_local, dtype=dtype, device=device)
        # [max_loras, out_local, rank]: each slice's B in its rows of the layer's output
        self.b_all = torch.zeros(max_loras, sum(s.size for s in slices), rank, dtype=dtype, device=device)
        # one expand launch for every slice: output tiles of block_n columns, none across two slices
        self.block_n = next((b for b in (128, 64, 32, 16) if all(s.size % b == 0 for s in slices)), 0)
        self.x_col = None  # [num_tiles] int32: the first column of the shrink's output each tile reads
        if self.block_n:
            cols = [i * rank for i, s in enumerate(slices) for _ in range(s.size // self.block_n)]
            self.x_col = torch.tensor(cols, dtype=torch.int32, device=device)

    def set_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one adapter's (A [r, in], B [out, r]) per module into slot; modules it lacks stay zero."""
        self.a_stack[slot].zero_()
        self.b_all[slot].zero_()
        for i, s, a, b in local_adapter_weights(self.slices, weights, self.row_parallel, self.in_start, self.in_local):
            r = a.shape[0]
            self.a_stack[slot, i * self.rank : i * self.rank + r].copy_(a, non_blocking=True)
            self.b_all[slot, s.offset : s.offset + s.size, :r].copy_(b, non_blocking=True)

    def apply(self, batch: LoRABatch, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [..., in_local], y [..., out_local] (the base output, before any all-reduce) -> y + deltas."""
        x2, y2 = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        out = None
        if batch.shrink_out is not None:  # zeroed once for the step: no memset here
            out = batch.shrink_out[: x2.shape[0], self.shrink_col : self.shrink_col + self.a_stack.shape[1]]
        t = shrink(batch, x2.contiguous(), self.a_stack, out)  # [num_tokens, num_slices * rank] float32
        if batch.use_triton and self.x_col is not None:
            expand_fused(batch, t, self.b_all, y2, self.x_col, self.block_n)
            return y
        for i, s in enumerate(self.slices):
            expand(batch, t[:, i * self.rank : (i + 1) * self.rank], self.b_all[:, s.offset : s.offset + s.size],
                   y2, s.offset)
        return y
