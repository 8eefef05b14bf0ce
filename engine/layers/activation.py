"""SiLU-and-mul: the gated activation of Llama/Qwen MLPs."""
from __future__ import annotations

import torch
from torch import nn

from engine.layers.ops import ops_for


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[num_tokens, 2 * d] -> [num_tokens, d]; out: where it goes (returned as is), e.g. the next projection's
        augmented_input()."""
        return ops_for(x).silu_and_mul(x, out=out)
