"""SiLU-and-mul: the gated activation of Llama/Qwen MLPs."""
from __future__ import annotations

import torch
from torch import nn

from engine.layers.ops import ops_for
from engine.layers.quant.fp8 import Fp8Activation


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor, fp8_out: bool = False) -> torch.Tensor | Fp8Activation:
        """[num_tokens, 2 * d] -> [num_tokens, d]; quantized per token for the FP8 GEMM after it with fp8_out
        (callers ask only on a GPU: engine.layers.quant.fp8.wants_fp8_input)."""
        if fp8_out:
            from gantry_kernels.activation import silu_and_mul_fp8

            return Fp8Activation(*silu_and_mul_fp8(x), x.dtype)
        return ops_for(x).silu_and_mul(x)
