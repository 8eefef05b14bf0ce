"""Pick the kernel implementation for a tensor: Triton on CUDA, C kernels (else plain torch) on CPU."""
from __future__ import annotations

from types import ModuleType

import torch

from gantry_kernels import cpu_ops


def ops_for(x: torch.Tensor) -> ModuleType:
    if x.is_cuda:
        import gantry_kernels.triton_ops as triton_ops  # noqa: PLC0415 - needs a GPU build of Triton

        return triton_ops
    return cpu_ops  # gantry_kernels/cpu_attention.c where it applies, else gantry_kernels/reference.py
