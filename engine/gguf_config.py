"""A GGUF file's HF config fields, without transformers: importing it costs the engine core ~90 MiB
and seconds of start-up, for a dozen metadata keys. The fields and defaults are those transformers
derives (its GGUF_CONFIG_MAPPING and the config classes' defaults) for the architectures engine/models
runs; tests/engine/test_gguf_config.py checks them against transformers for each one.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from engine.errors import ModelLoadError, UnsupportedArchitectureError

# llama.cpp's key (after "<arch>.") -> HF config key; the same for every architecture here
_REQUIRED_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
}
_OPTIONAL_KEYS = {
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
_TOKENIZER_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                   "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id"}
# What each HF config class adds (transformers 5) that the engine reads: the fields a config class
# lacks stay absent here too (Qwen2Config has no attention_bias: the model's default, a q/k/v bias, holds).
_COMMON_DEFAULTS = {"hidden_act": "silu", "attention_dropout": 0.0, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                    "dtype": None, "pad_token_id": None}
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2},
    "mistral": {"sliding_window": 4096, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"sliding_window": None, "use_sliding_window": False, "bos_token_id": None, "eos_token_id": None},
    # Qwen3Config's head_dim is 128 unless given (transformers maps no GGUF key to it): the key length
    # when the file has it, else that default
    "qwen3": {"attention_bias": False, "sliding_window": None, "use_sliding_window": False, "head_dim": 128,
              "bos_token_id": None, "eos_token_id": None},
}
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class GGUFConfig(SimpleNamespace):
    """The HF config of a GGUF model: its fields as attributes (engine code reads them with getattr)."""

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        """transformers 5's alias of rope_parameters (an hf_overrides of either sets both)."""
        return getattr(self, "rope_parameters", None)

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        self.rope_parameters = value


def gguf_model_type(arch: str, name: str) -> str:
    """HF model_type of a GGUF's general.architecture; llama.cpp writes Mistral as llama, told apart
    by general.name as transformers does."""
    return "mistral" if "llama" in arch and name == "mistral" else arch


def gguf_hf_config_dict(path: str, metadata: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The HF config's fields of the model in a GGUF file (metadata: its key-value pairs)."""
    arch = metadata.get("general.architecture")
    name = metadata.get("general.name", "")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitectureError(path, f"GGUF architecture {arch!r} is not supported; supported: "
                                           f"{', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")
    model_type = gguf_model_type(arch, name)
    config: dict[str, Any] = {"model_type": model_type, "_model_name_or_path": name,
                              **_COMMON_DEFAULTS, **_MODEL_DEFAULTS[model_type]}
    for key, hf_key in _REQUIRED_KEYS.items():
        if f"{arch}.{key}" not in metadata:
            raise ModelLoadError(path, f"GGUF metadata has no {arch}.{key} ({hf_key})")
        config[hf_key] = metadata[f"{arch}.{key}"]
    for key, hf_key in _OPTIONAL_KEYS.items():
        if f"{arch}.{key}" in metadata:
            config[hf_key] = metadata[f"{arch}.{key}"]
    config.setdefault("num_key_value_heads", config["num_attention_heads"])  # llama.cpp's default: no GQA
    if model_type in ("llama", "mistral"):  # transformers maps rope.dimension_count to head_dim for these
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        derived = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
        # None: model_config's shape check names the bad size (head_count 0 was a ZeroDivisionError here)
        config["head_dim"] = metadata.get(f"{arch}.rope.dimension_count", derived)
    elif model_type == "qwen3" and f"{arch}.attention.key_length" in metadata:
        config["head_dim"] = metadata[f"{arch}.attention.key_length"]
    # transformers >= 5 keeps theta in rope_parameters (rope_scaling is its alias); engine.layers.rotary reads it
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    for key, hf_key in _TOKENIZER_KEYS.items():
        if f"tokenizer.ggml.{key}" in metadata:
            config[hf_key] = metadata[f"tokenizer.ggml.{key}"]
    config["tie_word_embeddings"] = "output.weight" not in tensor_names
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in metadata:
        config["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return config
