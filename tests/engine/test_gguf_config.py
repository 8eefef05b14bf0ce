"""engine.gguf_config builds a GGUF's HF config without transformers, and it equals what transformers
builds from the same metadata (its GGUF_CONFIG_MAPPING, then its config class) on every field the
engine reads, for each architecture the engine loads from GGUF, and on the embedded SmolLM2 file."""
from __future__ import annotations

import os
from typing import Any

import pytest

from engine.errors import ModelLoadError, UnsupportedArchitectureError
from engine.gguf_config import SUPPORTED_GGUF_ARCHITECTURES, GGUFConfig
from engine.gguf_file import GGUFFile, GGUFTensorInfo, open_gguf

# every config field engine/ reads (models, layers.rotary, loader, lora, model_config, core_build); not
# torch_dtype, read only where dtype is None: transformers 5 makes it an alias of dtype
ENGINE_FIELDS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "max_position_embeddings",
                 "tie_word_embeddings", "attention_bias", "rope_parameters", "rope_scaling", "rope_theta",
                 "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config", "dtype", "hidden_act"]
MISSING = "<missing>"


def transformers_config(f: GGUFFile) -> Any:
    """What transformers makes of the file's metadata: its GGUF tables, then AutoConfig.for_model (the
    code engine.gguf_file ran before engine.gguf_config)."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch, name = f.metadata["general.architecture"], f.metadata.get("general.name", "")
    model_type = "mistral" if "llama" in arch and name == "mistral" else arch
    config: dict[str, Any] = {}
    for key, hf_key in GGUF_CONFIG_MAPPING[model_type].items():
        if hf_key and f"{arch}.{key}" in f.metadata:
            config[hf_key] = f.metadata[f"{arch}.{key}"]
    for key, hf_key in GGUF_CONFIG_MAPPING["tokenizer"].items():
        if f"tokenizer.{key}" in f.metadata:
            config[hf_key] = f.metadata[f"tokenizer.{key}"]
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in f.tensors)
    return AutoConfig.for_model(model_type, **config)


def engine_view(config: Any) -> dict[str, Any]:
    return {key: getattr(config, key, MISSING) for key in ENGINE_FIELDS}


def synthetic(arch: str, *, name: str = "tiny", tied: bool = True, extra: dict[str, Any] | None = None,
              drop: tuple[str, ...] = ()) -> GGUFFile:
    """Metadata as llama.cpp's convert script writes it for `arch` (no tensor data: the config needs none)."""
    meta: dict[str, Any] = {
        "general.architecture": arch, "general.name": name,
        f"{arch}.block_count": 3, f"{arch}.context_length": 4096, f"{arch}.embedding_length": 256,
        f"{arch}.feed_forward_length": 704, f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.freq_base": 500000.0,
        f"{arch}.vocab_size": 1000, "tokenizer.ggml.bos_token_id": 11, "tokenizer.ggml.eos_token_id": 12,
        "tokenizer.ggml.padding_token_id": 13, **(extra or {}),
    }
    for key in drop:
        del meta[key]
    tensors = [GGUFTensorInfo("token_embd.weight", (1000, 256), 8, 0)]
    if not tied:
        tensors.append(GGUFTensorInfo("output.weight", (1000, 256), 8, 0))
    return GGUFFile("tiny.gguf", meta, tensors)


CASES = {
    "llama": synthetic("llama", extra={"llama.rope.dimension_count": 64}),
    "llama untied, no rope.dimension_count": synthetic("llama", tied=False),
    "mistral (llama.cpp writes it as llama)": synthetic("llama", name="mistral",
                                                        extra={"llama.rope.dimension_count": 64}),
    "qwen2": synthetic("qwen2"),
    "qwen2 untied": synthetic("qwen2", tied=False),
    # every Qwen3 has 128-wide heads, wider than hidden / heads (64 here): transformers' default holds them
    "qwen3": synthetic("qwen3", extra={"qwen3.attention.key_length": 128, "qwen3.attention.value_length": 128}),
    "llama without the optional keys": synthetic("llama", drop=("llama.attention.layer_norm_rms_epsilon",
                                                                 "llama.rope.freq_base",
                                                                 "tokenizer.ggml.padding_token_id")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_config_equals_transformers_on_what_the_engine_reads(case: str) -> None:
    f = CASES[case]
    assert engine_view(f.hf_config()) == engine_view(transformers_config(f))


def test_every_supported_architecture_is_covered() -> None:
    assert {f.hf_config().model_type for f in CASES.values()} >= set(SUPPORTED_GGUF_ARCHITECTURES)


def test_embedded_model_config_equals_transformers(smollm2_path: str) -> None:
    """Against transformers' own GGUF loading of the file: the engine's fields, and every field ours holds."""
    from transformers import AutoConfig

    ours = open_gguf(smollm2_path).hf_config()
    ref = AutoConfig.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))
    assert engine_view(ours) == engine_view(ref)
    held = {k: v for k, v in vars(ours).items() if k != "_model_name_or_path"}  # transformers: the directory
    assert held == {k: getattr(ref, k, MISSING) for k in held}


def test_rope_scaling_override_sets_rope_parameters_as_in_transformers() -> None:
    """hf_overrides set attributes: rope_scaling is rope_parameters' alias (engine.layers.rotary reads the latter)."""
    ours, ref = CASES["qwen2"].hf_config(), transformers_config(CASES["qwen2"])
    for config in (ours, ref):
        config.rope_scaling = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert isinstance(ours, GGUFConfig) and engine_view(ours) == engine_view(ref)


def test_unsupported_architecture_and_missing_keys_are_named() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="'gemma2'.*llama, mistral, qwen2, qwen3"):
        synthetic("gemma2").hf_config()
    with pytest.raises(ModelLoadError, match=r"qwen2\.embedding_length \(hidden_size\)"):
        synthetic("qwen2", drop=("qwen2.embedding_length",)).hf_config()
