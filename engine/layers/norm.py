"""RMSNorm, optionally fused with the residual add (vLLM's forward(x, residual)), and on a GPU optionally
quantized per token for the FP8 GEMM after it (fp8_out: an Fp8Activation in place of the tensor)."""
from __future__ import annotations

import torch
from torch import nn

from engine.layers.ops import ops_for
from engine.layers.quant.fp8 import Fp8Activation


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8_out: bool = False
    ) -> torch.Tensor | Fp8Activation | tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
        if fp8_out:  # callers ask only on a GPU (engine.layers.quant.fp8.wants_fp8_input)
            from gantry_kernels.norm import rms_norm_fp8

            q, scale, new_residual = rms_norm_fp8(x, residual, self.weight, self.eps)
            out = Fp8Activation(q, scale, torch.result_type(x, self.weight))
            return out if residual is None else (out, new_residual)
        ops = ops_for(x)
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
