"""Which LoRA path each projection takes (GANTRY_LORA_PATH): one of three ways to add the adapters' deltas.

- stacked (engine/lora/stacked.py): every slot's A below the base weight; the shrink rides in the base GEMM,
  then y += t @ B^T. Its extra work grows with the layer's output.
- augmented (engine/lora/augmented.py): every slot's B beside the base weight; [x, t] @ [W | B]^T in one GEMM
  after a shrink and a copy of x. Its extra work grows with the layer's input.
- sgmv (engine/lora/layers.py): base GEMM, then punica's shrink and expand; quantized layers always.

auto (the default) takes stacked unless the output is over twice the input (gate_up: augmented).
H200, W1 decode (256 tokens, 8 rank-16 adapters, torch profiler): augmented's dense shrink and its split-K
reduce cost 8.7 µs a projection and the [x, t] build 2.9 µs, while its wider GEMM cost ~1%.
"""
from __future__ import annotations

import os

import torch
from torch import nn

LORA_PATHS = ("auto", "stacked", "augmented", "sgmv")


def lora_path() -> str:
    path = os.environ.get("GANTRY_LORA_PATH", "auto")
    if path not in LORA_PATHS:
        raise ValueError(f"GANTRY_LORA_PATH: must be one of {', '.join(LORA_PATHS)}, got {path!r}")
    return path


def plain_weight(linear: nn.Module, dtype: torch.dtype) -> bool:
    """A plain (unquantized) 2-D weight of the model's dtype, rows contiguous: a wider buffer can take its place."""
    w = getattr(linear, "weight", None)
    return (getattr(linear, "quant_method", None) is None and isinstance(w, torch.Tensor) and w.dim() == 2
            and w.dtype == dtype and w.stride(1) == 1 and w.stride(0) == w.shape[1])


def layer_path(path: str, linear: nn.Module, dtype: torch.dtype) -> str:
    """stacked, augmented or sgmv for this layer under GANTRY_LORA_PATH (as lora_path() read it)."""
    if path == "sgmv" or not plain_weight(linear, dtype):
        return "sgmv"
    if path != "auto":
        return path
    out_local, in_local = linear.weight.shape
    return "augmented" if out_local > 2 * in_local else "stacked"
