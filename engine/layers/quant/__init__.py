"""Quantized weights kept quantized: the quantization config a model's layers read, and its errors.

A checkpoint's quantization travels as hf_config.quantization_config (config.json's own key;
engine.model_config sets {"quant_method": "gguf"} for a .gguf file that stays quantized).
"""
from __future__ import annotations

from typing import Any

from engine.errors import ModelLoadError


class QuantizationError(ModelLoadError):
    """A quantized tensor this engine cannot run or shard; `tensor` names it."""

    def __init__(self, path: str, tensor: str, message: str):
        super().__init__(path, f"tensor {tensor!r}: {message}")
        self.tensor = tensor


class QuantizationConfig:
    """What the layers of one model ask of its quantization (vLLM's QuantizationConfig, reduced)."""

    name = ""

    def get_linear_method(self) -> Any:
        raise NotImplementedError

    def embedding_classes(self) -> tuple[type, type]:
        """(embedding, LM head) module classes."""
        raise NotImplementedError


def get_quant_config(hf_config: Any) -> QuantizationConfig | None:
    """The config of the model's quantization, None for plain weights."""
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method == "gguf":
        from engine.layers.quant.gguf import GGUFConfig

        return GGUFConfig()
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if method == "fp8" or (method == "compressed-tensors" and _is_float_quantized(qc)):
        from engine.layers.quant.fp8 import Fp8Config

        return Fp8Config.from_config(qc)
    if method == "compressed-tensors":
        from engine.layers.quant.compressed_tensors import CompressedTensorsConfig

        return CompressedTensorsConfig(qc)
    if method == "gptq":
        from engine.layers.quant.gptq import GPTQConfig

        return GPTQConfig(qc)
    if method == "awq":
        from engine.layers.quant.awq import AWQConfig

        return AWQConfig(qc)
    raise ModelLoadError("quantization", f"quant_method {method!r} is not supported")


def _is_float_quantized(qc: dict[str, Any]) -> bool:
    """compressed-tensors' FP8 format (the config's or its one group's `format`)."""
    groups = list((qc.get("config_groups") or {}).values())
    return "float-quantized" in (qc.get("format"), *(g.get("format") for g in groups if isinstance(g, dict)))
