"""Checks of loaded tensors' values, shared by the model loader and the LoRA adapter reader (torch is imported
when a check runs: the API process imports the adapter reader for lora_modules' headers and must not load torch)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t, computed on its device: a finite sum means every value is finite (one reduction, no
    mask of t's size as isfinite(t) makes; ~10x faster on a 7B adapter); a sum that is not finite, from a NaN or
    an inf or from finite values overflowing it, goes to the exact check."""
    import torch

    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())
