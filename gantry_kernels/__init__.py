"""Kernel dispatch: gantry_kernels.triton_ops on CUDA, gantry_kernels.reference (plain torch) on CPU.

Both modules define the same functions. GANTRY_TRITON_INTERPRET=1 (or TRITON_INTERPRET=1) runs the
Triton kernels on CPU through Triton's interpreter; set it before the first get_ops call that needs
them (Triton reads it when the kernels are defined).
"""
from __future__ import annotations

import os
from types import ModuleType

import torch


def interpret() -> bool:
    """True when the Triton kernels are to run under Triton's interpreter (on CPU tensors)."""
    return "1" in (os.environ.get("GANTRY_TRITON_INTERPRET"), os.environ.get("TRITON_INTERPRET"))


def get_ops(device: torch.device | str) -> ModuleType:
    """The kernel module for tensors on `device`."""
    if torch.device(device).type == "cuda" or interpret():
        if interpret():
            os.environ["TRITON_INTERPRET"] = "1"
        from gantry_kernels import triton_ops

        return triton_ops
    from gantry_kernels import reference

    return reference
