"""AWQ checkpoints (AutoAWQ's GEMM packing): 4-bit values packed into int32 along the OUTPUT dim in
AWQ's order [0, 2, 4, 6, 1, 3, 5, 7] (qweight [in, out / 8], qzeros [num_groups, out / 8] likewise),
scales [num_groups, out], w = (q - zero) * scale. Sharded as stored, then repacked at load to the
gptq_v2 layout (packed along the input dim), so one dequantize / kernel path serves both.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.config import ConfigError
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.quant import QuantizationConfig
from engine.layers.quant.gptq import (
    PackedLinearMethod,
    config_field,
    group_size_of,
    pack_cols,
    unpack_cols,
)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # word nibble i holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c sits at nibble AWQ_REVERSE_ORDER[c]


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, n / 8] in AWQ order -> int32 [rows, n] 4-bit values in column order."""
    values = unpack_cols(packed, 4).reshape(packed.shape[0], -1, 8)  # [rows, n / 8, nibble]
    return values[..., list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """float [out, in] = (q - zero[k // group]) * scale[k // group], from AWQ's own layout; computed in
    float32, returned in the scales' dtype."""
    q, zeros = unpack_awq(qweight), unpack_awq(qzeros)  # [in, out], [num_groups, out]
    groups = torch.arange(q.shape[0], device=q.device) // (q.shape[0] if group_size == -1 else group_size)
    w = (q - zeros[groups]).to(torch.float32) * scales[groups].to(torch.float32)  # [in, out]
    return w.t().to(scales.dtype)


def awq_to_gptq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's qweight [in, out / 8] and qzeros -> gptq_v2's qweight [in / 8, out] and qzeros [num_groups,
    out / 8], the same values (dequantize_gptq of the result equals dequantize_awq of the input)."""
    q = unpack_awq(qweight)  # [in, out]
    return pack_cols(q.t(), 4).t().contiguous(), pack_cols(unpack_awq(qzeros), 4)


class AWQConfig(QuantizationConfig):
    """config.json's quantization_config as AutoAWQ (and transformers' AwqConfig) write it."""

    name = "awq"

    def __init__(self, qc: dict[str, Any]):
        config_field(qc, ("bits", "w_bit"), (4,))
        self.group_size: int = group_size_of(qc, ("group_size", "q_group_size"))
        config_field(qc, ("zero_point",), (True,), True)
        version = qc.get("version", qc.get("format", "gemm"))
        if str(version).lower() != "gemm":
            key = "version" if "version" in qc else "format"
            raise ConfigError(f"quantization_config.{key}", f"{version!r} is not supported (supported: 'gemm')")
        if qc.get("modules_to_not_convert"):
            raise ConfigError("quantization_config.modules_to_not_convert",
                              f"unquantized layers {qc['modules_to_not_convert'][:3]} are not supported")

    def get_linear_method(self) -> AWQLinearMethod:
        return AWQLinearMethod(4, self.group_size, desc_act=False, zero_offset=0, layout="awq")

    def embedding_classes(self) -> tuple[type, type]:
        return VocabParallelEmbedding, ParallelLMHead


class AWQLinearMethod(PackedLinearMethod):
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        qweight, qzeros = awq_to_gptq(layer.qweight.data, layer.qzeros.data)
        layer.qweight.data, layer.qzeros.data = qweight, qzeros
        super().process_weights_after_loading(layer)
