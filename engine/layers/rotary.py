"""Rotary position embedding with a precomputed cos/sin cache: no scaling, linear, llama3."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from engine.config import ConfigError
from engine.layers.ops import ops_for

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_CACHE: dict[tuple, RotaryEmbedding] = {}  # see RotaryEmbedding.from_config
_max_positions: int | None = None  # set by rotary_positions while a model is built


@contextmanager
def rotary_positions(max_model_len: int) -> Iterator[None]:
    """Rotary caches built inside hold max_model_len positions, the most a sequence reaches, rather than the
    config's max_position_embeddings (10**9 in a config asked for terabytes at any max_model_len)."""
    global _max_positions
    previous, _max_positions = _max_positions, max_model_len
    try:
        yield
    finally:
        _max_positions = previous


def _inv_freq(rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    # float32 throughout, as transformers computes it, so greedy outputs match bit for bit
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError("rope_scaling", f"rope type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "linear":
        inv_freq = inv_freq / rope_scaling["factor"]
    elif rope_type == "llama3":  # Llama 3.1: low frequencies slowed, high kept, smooth between
        factor = rope_scaling["factor"]
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_len = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_medium, smoothed, inv_freq)
    return inv_freq


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None):
        super().__init__()
        inv_freq = _inv_freq(head_dim, base, rope_scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_position, head_dim / 2]
        # [max_position, head_dim]: cos in the first half, sin in the second
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)

    @classmethod
    def from_config(cls, head_dim: int, config: Any) -> RotaryEmbedding:
        """One instance per distinct rotary (vLLM's get_rope): every layer shares its cos/sin cache,
        computed once instead of per layer (30 x 2 MiB and a second of start-up for SmolLM2)."""
        # transformers >= 5 keeps theta and scaling in rope_parameters; older ones in rope_theta/rope_scaling
        params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        base = params.pop("rope_theta", None) or getattr(config, "rope_theta", None) or 10000.0
        device = torch.empty(0).device  # the model is built under `with torch.device(...)`
        positions = min(config.max_position_embeddings, _max_positions or config.max_position_embeddings)
        key = (head_dim, positions, base, repr(sorted(params.items())), str(device), torch.get_default_dtype())
        if key not in _ROPE_CACHE:
            _ROPE_CACHE[key] = cls(head_dim, positions, base, params or None)
        return _ROPE_CACHE[key]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # q: [num_tokens, num_heads, head_dim]
        return ops_for(q).rotary_embedding(positions, q, k, self.cos_sin_cache)
