"""EngineConfig and ServerConfig: the only configuration the engine and server read.

Plain dataclasses, validated in __post_init__; the launcher writes them (resolved) to
engine.yaml as two sections, `engine:` and `server:`, and `engine.serve --config` reads it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingParamsError


class ConfigError(ValueError):
    """A user-facing configuration error; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


_TYPE_TEXT = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
              dict: "a mapping", list: "a list", type(None): "null"}


def _members(tp: Any) -> tuple[Any, ...]:
    """The types a field annotation allows: (int, NoneType) for `int | None`, (dict,) for `dict[str, str]`."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return tuple(typing.get_origin(a) or a for a in (typing.get_args(tp) if union else (tp,)))


def _accepts(tp: type, value: Any) -> bool:
    """Whether value is of type tp: a bool is not an int here, an int is a float, a float is finite."""
    if tp is bool or isinstance(value, bool):
        return tp is bool and isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, tp)  # a dict's or list's items are checked by its field's own check


@functools.cache
def _field_types(cls: type) -> dict[str, tuple[Any, ...]]:
    return {name: _members(tp) for name, tp in typing.get_type_hints(cls).items()}  # annotations are strings here


def check_field_types(config: Any) -> None:
    """Every field of a config dataclass has its declared type, else a ConfigError naming it (LLM(...,
    max_num_seqs="8") failed later in a comparison, and enforce_eager="yes" was taken as true)."""
    for f in dataclasses.fields(config):
        allowed, value = _field_types(type(config))[f.name], getattr(config, f.name)
        if not any(_accepts(tp, value) for tp in allowed):
            expected = " or ".join(_TYPE_TEXT.get(tp, tp.__name__) for tp in allowed)
            raise ConfigError(f.name, f"must be {expected}, got {value!r} ({type(value).__name__})")


DEFAULT_API_KEY_ENV = "GANTRY_API_KEY"  # read when no key is configured (vLLM reads VLLM_API_KEY)
# vLLM's: the generation_config keys applied as defaults of requests that do not set them (max_new_tokens: max_tokens)
GENERATION_CONFIG_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
DTYPES = ("auto", "float16", "bfloat16", "float32", "half", "bf16", "fp16", "float", "fp32")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATIONS = ("auto", "none", "gguf", "gptq", "awq", "compressed-tensors", "fp8")  # vLLM's names, plus auto and none
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names; auto: the model dtype


def check_generation_value(param: str, key: str, value: Any, where: str = "") -> None:
    """A generation config value as a request default: what SamplingParams takes for that field
    (max_new_tokens: an integer >= 1), else a ConfigError naming param (where: the file, for the message)."""
    suffix = f" (in {where})" if where else ""
    if key == "max_new_tokens":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(param, f"must be an integer >= 1, got {value!r}{suffix}")
        return
    try:
        SamplingParams(**{key: value})
    except SamplingParamsError as e:
        raise ConfigError(param, str(e).split(": ", 1)[-1] + suffix) from None


# the unset step budget on CPU: 2 cores run the embedded SmolLM2-135M at ~6 ms a prompt token, so a step of prompt
# tokens takes ~3 s (a 1.5B model: ~40 s, still inside engine_hang_timeout_s's 60)
CPU_STEP_TOKENS = 512


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory or .gguf file
    tokenizer: str | None = None  # tokenizer directory or .gguf
    trust_remote_code: bool = False  # let transformers run the model directory's own config/tokenizer code (vLLM's)
    served_model_name: str | None = None  # name in the API
    dtype: str = "auto"  # auto | float16 | bfloat16 | float32 (auto: checkpoint dtype on GPU, float32 on CPU)
    max_model_len: int | None = None  # context length
    load_format: str = "auto"  # auto | safetensors | gguf | dummy (random weights from config.json)
    quantization: str = "auto"  # auto (from the checkpoint) | gguf | gptq | awq | compressed-tensors | fp8 | none (dequantize a GGUF at load)
    kv_cache_dtype: str = "auto"  # auto (model dtype) | fp8 | fp8_e4m3: KV pages in float8_e4m3fn, per-layer scales
    hf_overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields to override (dummy shapes)
    seed: int = 0  # seed for dummy weights and for requests that set no seed
    block_size: int = 16  # tokens per KV cache page
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use (weights + KV pool)
    kv_cache_memory_gib: float | None = None  # fixed KV pool size in GiB
    num_kv_blocks: int | None = None  # fixed number of KV pages (overrides the sizing above; tests)
    max_num_seqs: int = 256  # most requests running at once
    max_num_batched_tokens: int | None = None  # token budget per step (unset: 8,192 on a GPU, 512 on CPU)
    max_prefill_tokens_while_decoding: int | None = None  # prompt tokens per step while others decode (bounds their ITL), a token p deep counting 1 + p/21700 (Qwen2-7B); 0: prefill first
    enable_prefix_caching: bool = True  # share KV pages of identical prompt prefixes
    enforce_eager: bool = False  # never capture CUDA graphs
    tensor_parallel_size: int = 1  # ranks that split each layer
    pipeline_parallel_size: int = 1  # ranks that split the layer stack
    device: str = "auto"  # auto | cuda | cpu
    pipeline_parallel_lanes: int | None = None  # batches in flight with pp > 1 (1 to compare)
    distributed_timeout_s: float = 60.0  # a collective that waits longer than this means a dead rank
    async_scheduling: bool | None = None  # schedule step t+1 while step t runs
    generation_config: str = "auto"  # request defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens): auto (the model's generation_config.json) | vllm (none) | a directory
    override_generation_config: dict[str, Any] = field(default_factory=dict)  # on top, e.g. {"temperature": 0.6, "max_new_tokens": 512}
    enable_lora: bool = False  # serve PEFT LoRA adapters (engine/lora)
    lora_modules: dict[str, str] = field(default_factory=dict)  # adapters registered at start-up: name -> directory
    max_loras: int = 1  # adapters resident on the device at once (and so in one step)
    max_cpu_loras: int | None = None  # adapters cached in host memory (unset: max_loras)
    max_lora_rank: int = 16  # largest adapter rank served
    max_logprobs: int = 20  # most logprobs and prompt_logprobs a request may ask for (vLLM's; 20 at most)

    def step_token_budget(self, device_type: str) -> int:
        """max_num_batched_tokens resolved: unset means 8,192 on a GPU and CPU_STEP_TOKENS on CPU (a block at
        least). A CPU step of 8,192 prompt tokens takes over a minute even for the embedded 135M model, which
        engine_hang_timeout_s would take for a hung engine, and every other stream would wait that long."""
        return self.max_num_batched_tokens or max(8192 if device_type == "cuda" else CPU_STEP_TOKENS, self.block_size)

    def uses_async_scheduling(self, device_type: str) -> bool:
        """async_scheduling resolved: unset means on for GPUs without pipeline parallel (its lanes overlap
        instead; on CPU the host is the device, so there is nothing to overlap)."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return device_type == "cuda" and self.pipeline_parallel_size == 1

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES[:4])}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError("load_format", f"must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ConfigError("quantization", f"must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError("max_model_len", f"must be >= 1, got {self.max_model_len}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError("block_size", f"must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_gib is not None and not self.kv_cache_memory_gib > 0:
            raise ConfigError("kv_cache_memory_gib", f"must be > 0, got {self.kv_cache_memory_gib}")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_prefill_tokens_while_decoding is not None and self.max_prefill_tokens_while_decoding < 0:
            raise ConfigError("max_prefill_tokens_while_decoding",
                              f"must be >= 0 (0: prefill first), got {self.max_prefill_tokens_while_decoding}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks", f"must be >= 1, got {self.num_kv_blocks}")
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size", f"must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ConfigError("pipeline_parallel_size", f"must be >= 1, got {self.pipeline_parallel_size}")
        if self.pipeline_parallel_lanes is not None and self.pipeline_parallel_lanes < 1:
            raise ConfigError("pipeline_parallel_lanes", f"must be >= 1, got {self.pipeline_parallel_lanes}")
        if self.async_scheduling and self.pipeline_parallel_size > 1:
            raise ConfigError("async_scheduling", "does not work with pipeline_parallel_size > 1 (its lanes keep "
                              "several batches in flight instead)")
        if not self.distributed_timeout_s > 0:
            raise ConfigError("distributed_timeout_s", f"must be > 0, got {self.distributed_timeout_s}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError("device", f"must be auto, cuda or cpu, got {self.device!r}")
        if not isinstance(self.generation_config, str) or not self.generation_config:
            raise ConfigError("generation_config", f"must be auto, vllm or a directory, got {self.generation_config!r}")
        if not 0 <= self.max_logprobs <= MAX_LOGPROBS:  # vLLM's -1 (no cap) too: SamplingParams caps them at 20
            raise ConfigError("max_logprobs", f"must be in [0, {MAX_LOGPROBS}] (requests take at most "
                                              f"{MAX_LOGPROBS} logprobs here), got {self.max_logprobs}")
        self._check_generation_override()
        self._check_lora()

    def _check_lora(self) -> None:
        if self.lora_modules and not self.enable_lora:
            raise ConfigError("lora_modules", "adapters given but enable_lora is off: turn it on (--enable-lora; "
                                              "launcher: engine.enable_lora=true)")
        if not isinstance(self.lora_modules, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                               for k, v in self.lora_modules.items()):
            raise ConfigError("lora_modules", f"must map adapter names to directories, got {self.lora_modules!r}")
        if self.max_loras < 1:
            raise ConfigError("max_loras", f"must be >= 1, got {self.max_loras}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError("max_cpu_loras", f"must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras}")
        if self.max_lora_rank < 1:
            raise ConfigError("max_lora_rank", f"must be >= 1, got {self.max_lora_rank}")

    def _check_generation_override(self) -> None:
        override = self.override_generation_config
        if not isinstance(override, dict):
            raise ConfigError("override_generation_config", f"must be a JSON object, got {override!r}")
        for key, value in override.items():
            if key not in GENERATION_CONFIG_KEYS:
                raise ConfigError(f"override_generation_config.{key}",
                                  f"not applied by this engine (supported: {', '.join(GENERATION_CONFIG_KEYS)})")
            check_generation_value(f"override_generation_config.{key}", key, value)

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


REASONING_PARSERS = ("deepseek_r1", "qwen3")
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass
class ServerConfig:
    host: str = "0.0.0.0"  # address the API listens on
    port: int = 8000  # port the API listens on
    api_key: str | None = None  # the key itself (prefer api_key_env or api_key_file)
    api_key_env: str | None = None  # name of an environment variable holding the key
    api_key_file: str | None = None  # path of a file holding the key
    metrics_require_key: bool = False  # guard /metrics with the API key too
    max_waiting_requests: int = 1024  # beyond this many waiting requests, answer 503; one request of more sequences (prompts x n): 400
    max_request_body_bytes: int = 8 * 1024 * 1024  # larger bodies get 413
    shutdown_grace_s: float = 30.0  # SIGTERM: how long in-flight requests may finish
    log_requests: bool = True  # one info line per finished request
    ui: bool = True  # serve the built-in chat page at / and /ui (--disable-ui turns it off)
    api_server_count: int = 1  # API processes sharing the port and the one engine core
    engine_hang_timeout_s: float = 60.0  # no engine step for this long while it has work: 503, then exit 1
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (with the key)
    reasoning_parser: str | None = None  # deepseek_r1 | qwen3: <think> text goes to message.reasoning_content
    enable_auto_tool_choice: bool = False  # tool_choice "auto": the model decides, --tool-call-parser reads its calls
    tool_call_parser: str | None = None  # hermes | llama3_json | mistral: the model's tool-call format
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])  # CORS: origins browsers may call the API from (*: any)
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])  # CORS: methods a cross-origin request may use
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])  # CORS: headers a cross-origin request may send
    allow_credentials: bool = False  # CORS: browsers may send cookies and auth headers cross-origin

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", f"must be in 0..65535, got {self.port}")
        if self.max_waiting_requests < 1:
            raise ConfigError("max_waiting_requests", f"must be >= 1, got {self.max_waiting_requests}")
        if self.max_request_body_bytes < 1:
            raise ConfigError("max_request_body_bytes", f"must be >= 1, got {self.max_request_body_bytes}")
        if self.shutdown_grace_s < 0:
            raise ConfigError("shutdown_grace_s", f"must be >= 0 (0: abort in-flight requests), got {self.shutdown_grace_s}")
        if not 1 <= self.api_server_count <= 64:
            raise ConfigError("api_server_count", f"must be in 1..64, got {self.api_server_count}")
        if self.allow_runtime_lora_updating and self.api_server_count > 1:  # each process has its own names
            raise ConfigError("allow_runtime_lora_updating", "works with api_server_count 1 only")
        if not self.engine_hang_timeout_s > 0:
            raise ConfigError("engine_hang_timeout_s", f"must be > 0, got {self.engine_hang_timeout_s}")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):  # engine/server/tools.py's
            raise ConfigError("tool_call_parser", f"unknown parser {self.tool_call_parser!r}; choose one of "
                                                  f"{', '.join(TOOL_CALL_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ConfigError("tool_call_parser", "enable_auto_tool_choice needs a tool_call_parser")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):  # engine/server/reasoning.py's
            raise ConfigError("reasoning_parser", f"unknown parser {self.reasoning_parser!r}; choose one of "
                                                  f"{', '.join(REASONING_PARSERS)}")
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            values = getattr(self, name)
            if not all(isinstance(v, str) and v.strip() for v in values):  # []: none allowed
                raise ConfigError(name, f"must be a list of non-empty strings (* allows any), got {values!r}")

    def resolve_api_key(self) -> str | None:
        """The key from value, environment variable or file (in that order), else from
        $GANTRY_API_KEY when set; None: no auth."""
        return self.resolve_api_key_and_source()[0]

    def resolve_api_key_and_source(self) -> tuple[str | None, str | None]:
        """(key, where it came from) for the start-up log; (None, None): no auth."""
        if self.api_key:
            return self.api_key, "api_key"
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ConfigError("api_key_env", f"environment variable {self.api_key_env} is not set or empty")
            return value, self.api_key_env
        if self.api_key_file:
            try:
                with open(self.api_key_file, encoding="utf-8") as f:
                    value = f.read().strip()
            except OSError as e:
                raise ConfigError("api_key_file", f"cannot read {self.api_key_file}: {e.strerror}") from None
            if not value:
                raise ConfigError("api_key_file", f"{self.api_key_file} is empty")
            return value, f"file {self.api_key_file}"
        value = os.environ.get(DEFAULT_API_KEY_ENV)
        if value:  # nothing configured: the default variable, as vLLM reads VLLM_API_KEY
            return value, DEFAULT_API_KEY_ENV
        return None, None


def _build(cls: type, data: dict[str, Any], section: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}", f"unknown field (known: {', '.join(sorted(names))})")
    return cls(**data)


def load_config_file(path: str) -> tuple[EngineConfig, ServerConfig]:
    """Read engine.yaml: sections `engine:` (EngineConfig) and `server:` (ServerConfig)."""
    import yaml  # only the serve entry point reads files

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
    unknown = sorted(set(data) - {"engine", "server"})
    if unknown:
        raise ConfigError(unknown[0], f"unknown section in {path} (expected engine, server)")
    return _build(EngineConfig, data.get("engine") or {}, "engine"), _build(ServerConfig, data.get("server") or {}, "server")
