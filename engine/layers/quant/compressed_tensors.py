"""compressed-tensors `pack-quantized` weights (what llm-compressor writes for W4A16 / W8A16):
int4 or int8 values packed little-endian into int32 along the input dim (stored as q + 2^(bits-1)),
one scale per group of input columns (or per row), symmetric. Kept packed; on CUDA each matmul is
gantry_kernels.quant_gemm.dequant_gemm (dequantized inside Triton kernels), elsewhere torch dequantizes the
weight and calls the float matmul.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ConfigError
from engine.layers.embed_head import (
    ParallelLMHead,
    QuantParallelLMHead,
    QuantVocabParallelEmbedding,
    VocabParallelEmbedding,
)
from engine.layers.quant import QuantizationConfig, check_mapping, check_names


LM_HEAD_NAMES = ("lm_head", "re:.*lm_head")  # how llm-compressor recipes name the LM head in `ignore`


def _field(qc: dict[str, Any], key: str, allowed: tuple, where: str) -> Any:
    value = qc.get(key)
    if value not in allowed:
        raise ConfigError(f"quantization_config.{where}{key}", f"{value!r} is not supported (supported: {allowed})")
    return value


class CompressedTensorsConfig(QuantizationConfig):
    name = "compressed-tensors"

    def __init__(self, qc: dict[str, Any]):
        groups = check_mapping(qc.get("config_groups") or {}, "quantization_config.config_groups")
        if len(groups) != 1:
            raise ConfigError("quantization_config.config_groups", f"one group is supported, got {len(groups)}")
        (group_name, group), = groups.items()
        where = f"config_groups.{group_name}."
        check_mapping(group, f"quantization_config.{where}".rstrip("."))
        format_where, format_source = (where, group) if group.get("format") else ("", qc)
        _field(format_source, "format", ("pack-quantized",), format_where)
        if group.get("input_activations") or group.get("output_activations"):
            raise ConfigError(f"quantization_config.{where}input_activations", "only weight-only schemes (W4A16, W8A16) run")
        targets = set(group.get("targets") or [])
        if "Linear" not in targets or not targets <= {"Linear", "Embedding"}:
            raise ConfigError(f"quantization_config.{where}targets",
                              f"{group.get('targets')} (supported: ['Linear'], ['Linear', 'Embedding'])")
        self.embedding = "Embedding" in targets  # the token embedding packed too
        ignore = check_names(qc.get("ignore") or [], "quantization_config.ignore")
        others = [n for n in ignore if n not in LM_HEAD_NAMES]
        if others:
            raise ConfigError("quantization_config.ignore", f"unquantized layers {others[:3]} are not supported")
        self.lm_head = not set(ignore) & set(LM_HEAD_NAMES)  # "Linear" matches the LM head unless it is ignored
        weights = check_mapping(group.get("weights") or {}, f"quantization_config.{where}weights")
        wh = where + "weights."
        self.num_bits: int = _field(weights, "num_bits", (4, 8), wh)
        _field(weights, "type", ("int",), wh)
        _field(weights, "symmetric", (True,), wh)
        self.strategy: str = _field(weights, "strategy", ("group", "channel"), wh)
        self.group_size: int | None = weights.get("group_size") if self.strategy == "group" else None
        if self.strategy == "group" and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ConfigError(f"quantization_config.{wh}group_size", f"must be a positive integer, got {self.group_size!r}")

    def get_linear_method(self) -> CompressedTensorsLinearMethod:
        return CompressedTensorsLinearMethod(self)

    def embedding_classes(self) -> tuple[type, type]:
        embedding = partial(QuantVocabParallelEmbedding, quant_config=self) if self.embedding else VocabParallelEmbedding
        return embedding, partial(QuantParallelLMHead, quant_config=self) if self.lm_head else ParallelLMHead


class CompressedTensorsLinearMethod:
    """weight_packed int32 [out, in * bits / 32] and weight_scale [out, in / group_size] per layer."""

    def __init__(self, config: CompressedTensorsConfig):
        self.config = config

    def create_weights(self, layer: nn.Module, output_size: int, input_size: int) -> None:
        bits, group = self.config.num_bits, self.config.group_size or input_size
        layer.input_size, layer.group_size = input_size, group
        # a row-parallel shard that cuts a group: the loader names the tensor (RuntimeError -> ModelLoadError)
        layer.group_misfit = input_size % group != 0 or input_size * bits % 32 != 0
        dtype = torch.get_default_dtype()
        layer.register_parameter("weight", None)  # the packed parameters below stand for it
        layer.weight_packed = nn.Parameter(torch.empty(output_size, input_size * bits // 32, dtype=torch.int32),
                                           requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(output_size, max(1, input_size // group), dtype=dtype),
                                          requires_grad=False)
        layer.weight_shape = nn.Parameter(torch.empty(2, dtype=torch.int64), requires_grad=False)
        channel_rows = self.config.strategy == "channel" and layer.tp_dim == 1  # one scale a row: not split

        def checked(param: nn.Parameter, loaded: Any, *shard_id: Any) -> None:
            if layer.group_misfit:
                raise RuntimeError(f"group size {group} does not divide this rank's {input_size} input columns "
                                   f"({bits}-bit values packed 32 bits a word); use a smaller tensor_parallel_size")
            if channel_rows and param is layer.weight_scale:
                param.data.copy_(loaded if isinstance(loaded, torch.Tensor) else loaded[:])
                return
            layer.weight_loader(param, loaded, *shard_id)

        layer.weight_packed.weight_loader = layer.weight_scale.weight_loader = checked
        layer.weight_shape.weight_loader = lambda param, loaded, *shard_id: None  # known from the layer

    def load_shard(self, layer: nn.Module, loaded: Any, offset: int) -> None:
        raise AssertionError("compressed-tensors layers have no `weight` parameter")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # the same [out, in] words and scales, stored out-major (GPTQ's order): a decode GEMV's K tile then reads
        # rows of consecutive outputs, which the H200 streams faster (RESULTS.md, sixteenth session)
        for param in (layer.weight_packed, layer.weight_scale):
            param.data = param.data.t().contiguous().t()

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """float [out, in] = q * scale, q the signed values (compressed-tensors' own arithmetic)."""
        return self._dequantize(layer.weight_packed, layer.weight_scale)

    def dequantize_rows(self, layer: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """[num_rows] indices -> float [num_rows, in]: those rows of the [out, in] weight (a token embedding)."""
        return self._dequantize(layer.weight_packed[rows], layer.weight_scale[rows])

    def _dequantize(self, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """words int32 [rows, in * bits / 32], scales [rows, num_groups] -> [rows, in] in the scales' dtype."""
        packed = words.contiguous().view(torch.uint8)  # [rows, in * bits / 8], little-endian words
        if self.config.num_bits == 4:
            q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1).to(torch.int8) - 8
        else:
            q = (packed.to(torch.int16) - 128).to(torch.int8)
        rows, num_groups = scales.shape
        w = q.reshape(rows, num_groups, -1).to(torch.float32) * scales.to(torch.float32).unsqueeze(-1)
        return w.reshape(rows, -1).to(scales.dtype)  # [rows, num_groups, group] -> [rows, in]

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.is_cuda:  # Triton, imported only where a GPU runs it
            from gantry_kernels.quant_gemm import dequant_gemm

            return dequant_gemm(x, layer.weight_packed, layer.weight_scale, None, None, self.config.num_bits,
                                layer.group_size, "compressed-tensors", bias)
        return F.linear(x, self.dequantize(layer).to(x.dtype), bias)
