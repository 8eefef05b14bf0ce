"""LoRA inside the layer's own GEMM, in one of two layouts; the layer's `weight` stays a view of the bigger
weight, so a base-only step reads the view and never the adapters' part:

- mode "k" (augmented K): W_aug [out_local, in_local + num_cols] = [W | B_all], B_all holding every slot's B
  (scaled; slice i of slot s in its own rank columns, on its slice's rows only). A step with adapters runs one
  GEMM [x, t] @ W_aug^T, t = x @ A_all^T masked to each token's own slot (the shrink before the GEMM).
- mode "n" (augmented N): W_aug [out_local + num_cols, in_local] = [W; A_all]. One GEMM x @ W_aug^T gives
  [y, t] (the shrink inside the GEMM); t is masked in place and y += t @ B_all^T (the expand after it).

"n" skips the shrink's own launch and the copy of x into [x, t] but adds a pass over y, so it pays where the
output is not much wider than the input (qkv, o, down: not gate_up); t must be whole, so a row-parallel layer
takes it only unsharded (tp 1). num_cols = max_loras * num_slices * rank. Sharded as engine/lora/layers.py shards."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from engine.lora.layers import LoRASlice, local_adapter_weights
from engine.lora.punica import LoRABatch

LORA_PATHS = ("augmented", "augmented-k", "sgmv")
AUGMENT_MODES = ("k", "n")


def lora_path() -> str:
    """GANTRY_LORA_PATH: augmented (default: every plain weight, mode per layer as augment_mode picks),
    augmented-k (every plain weight in mode k) or sgmv (every layer); quantized layers stay on SGMV whatever
    it says."""
    path = os.environ.get("GANTRY_LORA_PATH", "augmented")
    if path not in LORA_PATHS:
        raise ValueError(f"GANTRY_LORA_PATH: must be one of {', '.join(LORA_PATHS)}, got {path!r}")
    return path


def use_augmented(path: str, linear: nn.Module, dtype: torch.dtype) -> bool:
    """Whether this layer takes an augmented GEMM under GANTRY_LORA_PATH (as lora_path() read it)."""
    return path != "sgmv" and can_augment(linear, dtype)


def can_augment(linear: nn.Module, dtype: torch.dtype) -> bool:
    """A plain (unquantized) 2-D weight of the model's dtype, rows contiguous: W_aug can take its place."""
    w = getattr(linear, "weight", None)
    return (getattr(linear, "quant_method", None) is None and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.dtype == dtype and w.stride(1) == 1 and w.stride(0) == w.shape[1])


def augment_mode(path: str, out_local: int, in_local: int, row_parallel: bool, tp_size: int) -> str:
    """"n" where the layer's output is at most twice its input and t comes out whole, else "k"."""
    if path == "augmented-k" or (row_parallel and tp_size > 1) or out_local > 2 * in_local:
        return "k"
    return "n"


class AugmentedLoRALinear:
    """Attached as `layer.lora` in place of LoRALinear; linear() is the layer's matmul with the deltas in it."""

    augmented = True

    def __init__(self, slices: list[LoRASlice], in_local: int, in_start: int, row_parallel: bool, max_loras: int,
                 rank: int, linear: nn.Module, mode: str | None = None):
        self.slices, self.rank, self.row_parallel = slices, rank, row_parallel
        self.in_local, self.in_start = in_local, in_start  # this rank's input columns (row-parallel)
        w = linear.weight  # [out_local, in_local]
        out_local = sum(s.size for s in slices)
        assert w.shape == (out_local, in_local), "LoRA slices do not tile the layer's weight"
        self.mode = mode or augment_mode(lora_path(), out_local, in_local, row_parallel,
                                         getattr(linear, "tp_size", 1))
        assert self.mode in AUGMENT_MODES, f"augmented LoRA mode must be one of {AUGMENT_MODES}, got {self.mode!r}"
        self.out_local, self.cols_per_slot = out_local, len(slices) * rank
        num_cols = max_loras * self.cols_per_slot
        zeros = dict(dtype=w.dtype, device=w.device)
        self.bias_aug = None  # mode n with a bias: [out_local + num_cols], zero past the layer's own
        if self.mode == "k":
            self.w_aug = torch.zeros(out_local, in_local + num_cols, **zeros)
            self.w_aug[:, :in_local].copy_(w.data)
            w.data = self.w_aug[:, :in_local]  # strides (in_local + num_cols, 1): cuBLAS/BLAS take it as is
            self.a_all = torch.zeros(num_cols, in_local, **zeros)  # every slot's A: slot-major, slice, rank
            self.b_all = self.w_aug[:, in_local:]  # [out_local, num_cols]
        else:
            self.w_aug = torch.zeros(out_local + num_cols, in_local, **zeros)
            self.w_aug[:out_local].copy_(w.data)
            w.data = self.w_aug[:out_local]  # contiguous: the base-only GEMM is the plain one
            self.a_all = self.w_aug[out_local:]
            self.b_all = torch.zeros(out_local, num_cols, **zeros)
            bias = getattr(linear, "bias", None)
            if isinstance(bias, torch.Tensor):
                self.bias_aug = torch.zeros(out_local + num_cols, **zeros)
                self.bias_aug[:out_local].copy_(bias.data)
                bias.data = self.bias_aug[:out_local]
        # [num_cols]: the slot each column of t belongs to (the CPU mask)
        self.col_slot = torch.arange(num_cols, device=w.device) // self.cols_per_slot

    def set_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one adapter's (A [r, in], B [out, r]) per module into slot; modules it lacks (and the
        previous adapter's columns) are zeroed."""
        cols = slice(slot * self.cols_per_slot, (slot + 1) * self.cols_per_slot)
        self.a_all[cols].zero_()
        self.b_all[:, cols].zero_()
        for i, s, a, b in local_adapter_weights(self.slices, weights, self.row_parallel, self.in_start, self.in_local):
            r = a.shape[0]
            start = cols.start + i * self.rank  # slice i's rank columns of t
            self.a_all[start : start + r].copy_(a, non_blocking=True)
            self.b_all[s.offset : s.offset + s.size, start : start + r].copy_(b, non_blocking=True)

    def _mask(self, batch: LoRABatch, t: torch.Tensor) -> torch.Tensor:
        """t [num_tokens, num_cols] (rows may be strided) with only each token's own slot's columns kept, in place."""
        if batch.use_triton:
            from gantry_kernels.lora import lora_mask_

            return lora_mask_(t, batch.token_slots, self.cols_per_slot)
        keep = self.col_slot[None, :] == batch.token_slots[: t.shape[0], None].to(self.col_slot.device)
        return t.masked_fill_(~keep, 0)

    def augment(self, batch: LoRABatch, x: torch.Tensor) -> torch.Tensor:
        """Mode k: x [num_tokens, in_local] -> [x, t] [num_tokens, in_local + num_cols], t = x @ A_all^T with
        only each token's own slot's columns kept (all zero for tokens without an adapter)."""
        t = torch.mm(x, self.a_all.t())  # [num_tokens, num_cols]: one dense GEMM over every slot's A
        if batch.use_triton:
            from gantry_kernels.lora import lora_augment

            out = torch.empty(x.shape[0], self.w_aug.shape[1], dtype=x.dtype, device=x.device)
            return lora_augment(x, t, batch.token_slots, self.cols_per_slot, out)
        return torch.cat([x, self._mask(batch, t)], dim=1)

    def linear(self, batch: LoRABatch, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in_local] -> x @ W^T (+ bias) plus each token's adapter delta, [..., out_local] (mode n: rows
        strided by out_local + num_cols)."""
        assert batch.token_slots is not None, "the augmented LoRA path needs the batch's per-token slots"
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if self.mode == "k":
            y = F.linear(self.augment(batch, x2), self.w_aug, bias)  # [num_tokens, out_local]
        else:
            assert bias is None or bias.data_ptr() == self.bias_aug.data_ptr(), "mode n adds the layer's own bias"
            yt = F.linear(x2, self.w_aug, None if bias is None else self.bias_aug)  # [num_tokens, out + num_cols]
            y, t = yt[:, : self.out_local], yt[:, self.out_local :]
            y.addmm_(self._mask(batch, t), self.b_all.t())  # the expand, in place (ldc = out + num_cols)
        return y.view(*x.shape[:-1], y.shape[-1])
