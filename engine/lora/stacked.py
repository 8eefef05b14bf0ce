"""LoRA by stacked A: the base weight lives in W_stack [out_local + max_loras * num_slices * rank, in_local],
every slot's A in the rows below it (slot-major, then slice, then rank), and the layer's `weight` is the view
W_stack[:out_local] (rows contiguous: a base-only step's GEMM is the plain one, the extra rows never read).
A step with adapters runs one GEMM [y, t] = x @ W_stack^T, so the shrink rides in the base GEMM; one kernel
copies y out and masks t to each token's own slot; then y += t @ B_all^T, one GEMM in place. Sharded as
engine/lora/layers.py shards (row-parallel: A on its input columns, the partial t's deltas summed by the
layer's all-reduce)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.lora.layers import LoRASlice, local_adapter_weights
from engine.lora.punica import LoRABatch


class StackedLoRALinear:
    """Attached as `layer.lora`; linear() is the layer's matmul with the deltas in it."""

    owns_gemm = True  # linear() is the layer's whole matmul (engine/layers/linear.py)

    def __init__(self, slices: list[LoRASlice], in_local: int, in_start: int, row_parallel: bool, max_loras: int,
                 rank: int, linear: nn.Module):
        self.slices, self.rank, self.row_parallel = slices, rank, row_parallel
        self.in_local, self.in_start = in_local, in_start  # this rank's input columns (row-parallel)
        w = linear.weight  # [out_local, in_local]
        self.out_local = w.shape[0]
        assert w.shape == (sum(s.size for s in slices), in_local), "LoRA slices do not tile the layer's weight"
        self.cols_per_slot = len(slices) * rank
        num_cols = max_loras * self.cols_per_slot
        # [out_local + num_cols, in_local]; the base weight moves in, its parameter becomes a view of it
        self.w_stack = torch.zeros(self.out_local + num_cols, in_local, dtype=w.dtype, device=w.device)
        self.w_stack[: self.out_local].copy_(w.data)
        w.data = self.w_stack[: self.out_local]
        # [out_local, num_cols]: every slot's B (scaled), slice i of slot s on its slice's rows, its rank columns
        self.b_all = torch.zeros(self.out_local, num_cols, dtype=w.dtype, device=w.device)
        # a column-parallel bias (row-parallel layers add theirs after the all-reduce), zero for the t columns
        self.bias_stack = None
        if getattr(linear, "bias", None) is not None and not row_parallel:
            self.bias_stack = torch.zeros(self.out_local + num_cols, dtype=linear.bias.dtype, device=w.device)
            self.bias_stack[: self.out_local].copy_(linear.bias.data)
            linear.bias.data = self.bias_stack[: self.out_local]
        # [num_cols]: the slot each column of t belongs to (the CPU mask)
        self.col_slot = torch.arange(num_cols, device=w.device) // self.cols_per_slot

    def set_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one adapter's (A [r, in], B [out, r]) per module into slot; modules it lacks (and the
        previous adapter's rows and columns) are zeroed."""
        cols = slice(slot * self.cols_per_slot, (slot + 1) * self.cols_per_slot)
        self.w_stack[self.out_local + cols.start : self.out_local + cols.stop].zero_()
        self.b_all[:, cols].zero_()
        for i, s, a, b in local_adapter_weights(self.slices, weights, self.row_parallel, self.in_start, self.in_local):
            r = a.shape[0]
            start = cols.start + i * self.rank  # slice i's rank columns of t
            self.w_stack[self.out_local + start : self.out_local + start + r].copy_(a, non_blocking=True)
            self.b_all[s.offset : s.offset + s.size, start : start + r].copy_(b, non_blocking=True)

    def linear(self, batch: LoRABatch, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in_local] -> x @ W^T (+ bias) plus each token's adapter delta, [..., out_local]."""
        assert batch.token_slots is not None, "the stacked LoRA path needs the batch's per-token slots"
        assert bias is None or self.bias_stack is not None, "a bias the stack was not built with"
        x2 = x.reshape(-1, x.shape[-1])
        yt = F.linear(x2, self.w_stack, None if bias is None else self.bias_stack)  # [num_tokens, out_local + num_cols]
        if batch.use_triton:
            from kernels.lora import lora_split_mask

            y, t = lora_split_mask(yt, self.out_local, batch.token_slots, self.cols_per_slot)
        else:
            mask = self.col_slot[None, :] == batch.token_slots[: x2.shape[0], None].to(self.col_slot.device)
            y, t = yt[:, : self.out_local].contiguous(), yt[:, self.out_local :] * mask
        y.addmm_(t, self.b_all.t())  # [num_tokens, out_local]: the deltas, in place
        return y.view(*x.shape[:-1], self.out_local)
