"""SiLU-and-mul: the gated activation of Llama/Qwen MLPs."""
from __future__ import annotations

import torch
from torch import nn

from engine.layers.ops import ops_for


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
        return ops_for(x).silu_and_mul(x)
