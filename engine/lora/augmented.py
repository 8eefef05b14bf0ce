"""LoRA by augmented K: the base weight lives in W_aug [out_local, in_local + max_loras * num_slices * rank]
whose tail columns hold every slot's B (scaled; slice i of slot s in its own rank columns, on its slice's
rows only), and the layer's `weight` is the view W_aug[:, :in_local]. A step with adapters runs ONE GEMM
[x, t] @ W_aug^T, t = x @ A_all^T masked to each token's own slot, instead of base GEMM + shrink + expand;
a base-only step reads the view and never the tail. Sharded as engine/lora/layers.py shards."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.lora.layers import LoRASlice, local_adapter_weights
from engine.lora.punica import LoRABatch

LORA_PATHS = ("augmented", "sgmv")


def lora_path() -> str:
    """GANTRY_LORA_PATH: augmented (default: every plain weight) or sgmv (every layer); quantized layers stay on
    SGMV whatever it says. No per-layer rule: on the H200 (W1, 8 rank-16 adapters, random adapter per request)
    augmented reached 0.849 of no-LoRA tok/s, down_proj alone on SGMV (out >= in augmented) 0.835, sgmv 0.813."""
    path = os.environ.get("GANTRY_LORA_PATH", "augmented")
    if path not in LORA_PATHS:
        raise ValueError(f"GANTRY_LORA_PATH: must be one of {', '.join(LORA_PATHS)}, got {path!r}")
    return path


def use_augmented(path: str, linear: nn.Module, dtype: torch.dtype) -> bool:
    """Whether this layer takes augmented K under GANTRY_LORA_PATH (as lora_path() read it)."""
    return path == "augmented" and can_augment(linear, dtype)


def can_augment(linear: nn.Module, dtype: torch.dtype) -> bool:
    """A plain (unquantized) 2-D weight of the model's dtype, rows contiguous: W_aug can take its place."""
    w = getattr(linear, "weight", None)
    return (getattr(linear, "quant_method", None) is None and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.dtype == dtype and w.stride(1) == 1 and w.stride(0) == w.shape[1])


class AugmentedLoRALinear:
    """Attached as `layer.lora` in place of LoRALinear; linear() is the layer's matmul with the deltas in it."""

    augmented = True

    def __init__(self, slices: list[LoRASlice], in_local: int, in_start: int, row_parallel: bool, max_loras: int,
                 rank: int, linear: nn.Module):
        self.slices, self.rank, self.row_parallel = slices, rank, row_parallel
        self.in_local, self.in_start = in_local, in_start  # this rank's input columns (row-parallel)
        w = linear.weight  # [out_local, in_local]
        assert w.shape == (sum(s.size for s in slices), in_local), "LoRA slices do not tile the layer's weight"
        self.cols_per_slot = len(slices) * rank
        num_cols = max_loras * self.cols_per_slot
        # [max_loras * num_slices * rank, in_local]: every slot's A, slot-major then slice then rank
        self.a_all = torch.zeros(num_cols, in_local, dtype=w.dtype, device=w.device)
        # [out_local, in_local + num_cols]; the base weight moves in, its parameter becomes a view of it
        self.w_aug = torch.zeros(w.shape[0], in_local + num_cols, dtype=w.dtype, device=w.device)
        self.w_aug[:, :in_local].copy_(w.data)
        w.data = self.w_aug[:, :in_local]  # strides (in_local + num_cols, 1): cuBLAS/BLAS take it as is
        # [num_cols] int32: the slot each column of t belongs to (the CPU mask)
        self.col_slot = torch.arange(num_cols, device=w.device) // self.cols_per_slot

    def set_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one adapter's (A [r, in], B [out, r]) per module into slot; modules it lacks (and the
        previous adapter's columns) are zeroed."""
        cols = slice(slot * self.cols_per_slot, (slot + 1) * self.cols_per_slot)
        self.a_all[cols].zero_()
        self.w_aug[:, self.in_local + cols.start : self.in_local + cols.stop].zero_()
        for i, s, a, b in local_adapter_weights(self.slices, weights, self.row_parallel, self.in_start, self.in_local):
            r = a.shape[0]
            start = cols.start + i * self.rank  # slice i's rank columns of t; in W_aug, after the in_local ones
            self.a_all[start : start + r].copy_(a, non_blocking=True)
            tail = self.in_local + start
            self.w_aug[s.offset : s.offset + s.size, tail : tail + r].copy_(b, non_blocking=True)

    def augment(self, batch: LoRABatch, x: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, in_local] -> [x, t] [num_tokens, in_local + num_cols], t = x @ A_all^T with only
        each token's own slot's columns kept (all zero for tokens without an adapter)."""
        assert batch.token_slots is not None, "the augmented LoRA path needs the batch's per-token slots"
        t = torch.mm(x, self.a_all.t())  # [num_tokens, num_cols]: one dense GEMM over every slot's A
        if batch.use_triton:
            from kernels.lora import lora_augment

            out = torch.empty(x.shape[0], self.w_aug.shape[1], dtype=x.dtype, device=x.device)
            return lora_augment(x, t, batch.token_slots, self.cols_per_slot, out)
        mask = self.col_slot[None, :] == batch.token_slots[: x.shape[0], None].to(self.col_slot.device)
        return torch.cat([x, t * mask], dim=1)

    def linear(self, batch: LoRABatch, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in_local] -> x @ W^T (+ bias) plus each token's adapter delta, [..., out_local]."""
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = F.linear(self.augment(batch, x2), self.w_aug, bias)  # [num_tokens, out_local]
        return y.view(*x.shape[:-1], y.shape[-1])
