"""vLLM engine arguments that are not EngineConfig fields, taken by LLM(...) and by `engine.serve` flags so that
ported scripts and command lines run: each is mapped to a field (num_gpu_blocks_override: num_kv_blocks), taken at
the value that is what Gantry does, taken with one warning line where vLLM v1 ignores it too, or refused with a
ConfigError naming it and saying why. Never silently changed."""
from __future__ import annotations

import logging
from typing import Any

from engine.config import ConfigError

logger = logging.getLogger("gantry.config")

# name -> (vLLM's default, its type): what LLM(...) takes besides EngineConfig's fields
VLLM_ARGS: dict[str, tuple[Any, tuple[type, ...]]] = {
    "num_gpu_blocks_override": (None, (int,)),
    "disable_log_stats": (True, (bool,)),  # LLM's default; the server's is False
    "enable_chunked_prefill": (None, (bool,)),
    "swap_space": (4, (int, float)),
    "tokenizer_mode": ("auto", (str,)),
    "skip_tokenizer_init": (False, (bool,)),
    "max_seq_len_to_capture": (8192, (int,)),
    "revision": (None, (str,)),
    "download_dir": (None, (str,)),
    "distributed_executor_backend": (None, (str,)),
}
TOKENIZER_MODES = ("auto", "hf")  # both: transformers' AutoTokenizer, fast where the model has one
EXECUTOR_BACKENDS = ("mp",)  # the engine core and any other ranks run as processes of their own
NO_DOWNLOADS = "this engine loads local paths only, it downloads nothing: fetch the model first " \
               "(huggingface-cli download) and give its directory as model"


def _check_type(name: str, value: Any, types: tuple[type, ...]) -> None:
    if value is None or (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise ConfigError(name, f"must be {expected}, got {value!r} ({type(value).__name__})")


def resolve_vllm_args(kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(EngineConfig kwargs, warning lines) from kwargs holding vLLM's arguments (VLLM_ARGS, and seed=None) besides
    EngineConfig's; raises ConfigError naming an argument Gantry cannot honour. The caller logs the warnings once
    logging is set up."""
    out = {k: v for k, v in kwargs.items() if k not in VLLM_ARGS}
    given = {k: v for k, v in kwargs.items() if k in VLLM_ARGS}
    warnings: list[str] = []
    if "seed" in out and out["seed"] is None:  # vLLM's LLM default before seed became an int
        out["seed"] = 0
        warnings.append("seed=None is seed=0, as in vLLM's v1 engine")
    for name, value in given.items():
        default, types = VLLM_ARGS[name]
        if value is None and default is None:
            continue
        _check_type(name, value, types)
        warning = _resolve(name, value, out)
        if warning:
            warnings.append(f"{name}={value!r}: {warning}")
    return out, warnings


def _resolve(name: str, value: Any, out: dict[str, Any]) -> str | None:
    """Apply one vLLM argument to the EngineConfig kwargs out; a warning line, or None."""
    if name == "num_gpu_blocks_override":  # vLLM's name for a fixed number of KV pages
        if out.get("num_kv_blocks") not in (None, value):
            raise ConfigError(name, f"{value} but num_kv_blocks is {out['num_kv_blocks']}: give one of them")
        out["num_kv_blocks"] = value
    elif name == "disable_log_stats":
        if not value:  # `engine.serve --disable-log-stats` can only say true
            return "this engine logs no periodic stats (the server's /metrics has them); nothing is logged"
    elif name == "enable_chunked_prefill":
        if not value:
            raise ConfigError(name, "prompts are always prefilled in chunks of at most max_num_batched_tokens "
                                    "here; it cannot be turned off (leave it unset or true)")
    elif name == "swap_space":
        if value < 0:
            raise ConfigError(name, f"must be >= 0, got {value}")
        if value != VLLM_ARGS[name][0]:
            return "ignored, as vLLM's v1 engine ignores it (a preempted request is recomputed, not swapped)"
    elif name == "tokenizer_mode":
        if value not in TOKENIZER_MODES:
            raise ConfigError(name, f"{value!r} is not supported: the tokenizer is transformers' AutoTokenizer, "
                                    f"fast where the model has one (supported: {', '.join(TOKENIZER_MODES)})")
    elif name == "skip_tokenizer_init":
        if value:
            raise ConfigError(name, "not supported: the engine loads the model's tokenizer (its stop tokens and "
                                    "output text come from it); give token-id prompts with the tokenizer loaded")
    elif name == "max_seq_len_to_capture":
        if value < 1:
            raise ConfigError(name, f"must be >= 1, got {value}")
        if value != VLLM_ARGS[name][0]:
            return "ignored, as vLLM's v1 engine ignores it (CUDA graphs cover decode batches, any context length)"
    elif name in ("revision", "download_dir"):
        raise ConfigError(name, NO_DOWNLOADS)
    elif name == "distributed_executor_backend":
        if value not in EXECUTOR_BACKENDS:
            raise ConfigError(name, f"{value!r} is not supported: the engine core and its ranks run as processes "
                                    f"(mp), or under torchrun (supported: {', '.join(EXECUTOR_BACKENDS)}, or unset)")
    return None


def log_warnings(warnings: list[str]) -> None:
    for line in warnings:
        logger.warning("%s", line)
