"""Checks of a model config as read (config.json or a GGUF's), hf_overrides applied: the JSON's shapes
transformers reads without checking, the attention shape, the fields the model reads, rope scaling and EOS ids.
Each failure is a ConfigError or ModelLoadError naming the field (hf_overrides.<key> when an override set it).
No torch: the API process runs them too."""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

from engine.config import ConfigError
from engine.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def _field_param(key: str, overrides: dict[str, Any], source: str) -> str:
    """The field a ConfigError names: hf_overrides.<key> when the override set it, else <source>.<key>
    (config.json or gguf)."""
    return f"hf_overrides.{key}" if key in overrides else f"{source}.{key}"


def check_raw_config(path: str, raw: Any) -> None:
    """config.json's shapes transformers reads without checking: null escaped as a TypeError, a string
    quantization_config as an AttributeError, and architectures "LlamaForCausalLM" was read a letter at
    a time (the error then said LlamaForCausalLM was not supported)."""
    if not isinstance(raw, dict):
        raise ModelLoadError(path, f"must hold a JSON object, got {type(raw).__name__}")
    archs = raw.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ModelLoadError(path, f"architectures must be a list of class names, got {archs!r}")
    qc = raw.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):
        raise ModelLoadError(path, f"quantization_config must be a JSON object, got {qc!r}")


def derived_head_dim(config: PretrainedConfig) -> bool:
    """Whether the checkpoint's head_dim is hidden_size / num_attention_heads (transformers and our GGUF
    reader write that one out) rather than a size of its own (Qwen3's 128)."""
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None or not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1:
        return True
    return hidden % heads == 0 and head_dim == hidden // heads


def check_shape(config: PretrainedConfig, overrides: dict[str, Any], derived_head_dim: bool, source: str) -> None:
    """The attention shape the model is built from, hf_overrides applied: positive sizes, hidden_size split
    into num_attention_heads (a derived head_dim follows an override of either), query heads grouped over
    num_key_value_heads; a ConfigError names the override, else the checkpoint's field (source: config.json
    or gguf). hf_overrides={"num_attention_heads": 3} on hidden_size 64 loaded and generated garbage."""
    def param(*keys: str) -> str:  # the first key overridden, else the first
        return _field_param(next((k for k in keys if k in overrides), keys[0]), overrides, source)

    if not hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = getattr(config, "num_attention_heads", None)  # no GQA
    sizes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
             "vocab_size", "max_position_embeddings", "head_dim")
    for key in sizes:
        value = getattr(config, key, None)
        if value is None and key == "head_dim":  # derived below
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(param(key), f"must be an integer >= 1, got {value!r}")
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    if "head_dim" not in overrides and derived_head_dim:
        if hidden % heads:
            raise ConfigError(param("num_attention_heads", "hidden_size"),
                              f"hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                              "(or give head_dim too)")
        config.head_dim = hidden // heads
    if heads % kv_heads:
        raise ConfigError(param("num_key_value_heads", "num_attention_heads"),
                          f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv_heads}")


# config.json fields transformers would default (LlamaConfig: hidden_size 4096, 32 layers, vocab 32000, ...)
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads", "intermediate_size")


def check_model_fields(path: str, config: PretrainedConfig, raw: dict[str, Any], overrides: dict[str, Any],
                        is_gguf: bool) -> None:
    """Of a supported architecture: the sizes are in config.json (raw: its fields as written) or hf_overrides,
    not transformers' defaults (a config without hidden_size was built at 4096 and failed on the first
    weight, naming no field); the fields the model reads are ones it implements: hidden_act silu (SiluAndMul
    whatever it says), rms_norm_eps and rope_theta positive numbers (rope_theta 'x' escaped as a TypeError),
    eos_token_id in the vocabulary."""
    source = "gguf" if is_gguf else "config.json"

    def param(key: str) -> str:
        return _field_param(key, overrides, source)

    if not is_gguf:
        aliases = {ours: alias for alias, ours in getattr(config, "attribute_map", {}).items()}
        for key in REQUIRED_FIELDS:
            if key not in raw and aliases.get(key) not in raw and key not in overrides:
                raise ConfigError(param(key), f"missing from {os.path.join(path, 'config.json')}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers: the same SiLU
        raise ConfigError(param("hidden_act"), f"{act!r} is not supported (the MLP of {config.architectures[0]} is silu)")
    rope = getattr(config, "rope_parameters", None)
    theta_key = "rope_parameters" if isinstance(rope, dict) and "rope_theta" in rope else "rope_theta"
    for key, value in (("rms_norm_eps", getattr(config, "rms_norm_eps", 1e-6)),
                       (theta_key, rope["rope_theta"] if theta_key == "rope_parameters" else getattr(config, "rope_theta", 1.0))):
        if value is None and key != "rms_norm_eps":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            name = "rope_theta" if key == "rope_parameters" else key
            raise ConfigError(param(key), f"{name} must be a number > 0, got {value!r}")
    _check_rope_scaling(config, raw, overrides, source)
    check_token_ids(param("eos_token_id"), getattr(config, "eos_token_id", None), config.vocab_size)


# what engine.layers.rotary reads of each scaled rope type: a number > 0 (an integer for the context length)
_ROPE_SCALING_FIELDS = {"linear": ("factor",),
                        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _check_rope_scaling(config: PretrainedConfig, raw: dict[str, Any], overrides: dict[str, Any], source: str) -> None:
    """The scaling fields the rotary embedding divides by: factor 0 or NaN loaded and generated token 0
    forever, factor "x" or null escaped as a TypeError, llama3's low_freq_factor 0 as a ZeroDivisionError
    (transformers only logs a warning for these)."""
    key = next((k for k in ("rope_scaling", "rope_parameters") if k in overrides),
               "rope_scaling" if "rope_scaling" in raw and "rope_parameters" not in raw else "rope_parameters")
    where = f"hf_overrides.{key}" if key in overrides else f"{source}.{key}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise ConfigError(where, f"must be a mapping, got {rope!r}")
    fields = _ROPE_SCALING_FIELDS.get(rope.get("rope_type", rope.get("type")), ())
    for name in fields:
        value = rope.get(name)
        kind = int if name == "original_max_position_embeddings" else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value <= 0:
            what = "an integer >= 1" if kind is int else "a number > 0"
            raise ConfigError(f"{where}.{name}", f"must be {what}, got {value!r}")
    if "low_freq_factor" in fields and rope["low_freq_factor"] > rope["high_freq_factor"]:  # equal: no band, as HF
        raise ConfigError(f"{where}.low_freq_factor", f"must not exceed high_freq_factor "
                          f"({rope['high_freq_factor']}), got {rope['low_freq_factor']}")


def check_token_ids(param: str, value: Any, vocab_size: int) -> None:
    """EOS ids (an int, a list of them or None) name tokens of the vocabulary: one outside it never ends a
    sequence (no sampled token has it), and a negative one under min_tokens masks another token (it
    indexes the logits from the end)."""
    for token in value if isinstance(value, list) else [] if value is None else [value]:
        if isinstance(token, bool) or not isinstance(token, int):
            raise ConfigError(param, f"must be a token id or a list of them, got {value!r}")
        if not 0 <= token < vocab_size:
            of = f" (of {value})" if isinstance(value, list) else ""
            raise ConfigError(param, f"{token}{of} is outside the vocabulary (vocab_size {vocab_size})")
