"""Quantized weights kept quantized: the quantization config a model's layers read, and its errors.

A checkpoint's quantization travels as hf_config.quantization_config (config.json's own key;
engine.model_config sets {"quant_method": "gguf"} for a .gguf file that stays quantized).
"""
from __future__ import annotations

from typing import Any

from engine.config import ConfigError
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


def check_mapping(value: Any, param: str) -> dict[str, Any]:
    """A quantization_config section that must be a JSON object (a group of null escaped as an AttributeError)."""
    if not isinstance(value, dict):
        raise ConfigError(param, f"must be a JSON object, got {value!r}")
    return value


def check_names(value: Any, param: str) -> list[str]:
    """A list of module names (ignore "lm_head" was read a letter at a time: unquantized layers ['l', 'm', '_'])."""
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ConfigError(param, f"must be a list of module names, got {value!r}")
    return value


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
    groups = qc.get("config_groups") or {}
    groups = list(groups.values()) if isinstance(groups, dict) else []  # the config's own check names the field
    return "float-quantized" in (qc.get("format"), *(g.get("format") for g in groups if isinstance(g, dict)))
