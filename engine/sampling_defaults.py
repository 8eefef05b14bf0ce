"""Request defaults from the generation config (vLLM's get_diff_sampling_param): the applied keys as
SamplingParams fields, the start-up line naming them, and filling the fields a request left unset."""
from __future__ import annotations

import logging
from typing import Any

from engine.config import EngineConfig

logger = logging.getLogger("gantry.engine")

# transformers' GenerationConfig defaults: a file value equal to one is no recommendation (vLLM reads the file's
# to_diff_dict(), so a generation_config.json that spells out top_k 50 leaves requests' top_k alone)
HF_GENERATION_DEFAULTS: dict[str, Any] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}


def sampling_defaults(generation_config: dict[str, Any]) -> dict[str, Any]:
    """Applied generation config keys as SamplingParams fields (max_new_tokens is max_tokens)."""
    return {("max_tokens" if k == "max_new_tokens" else k): v for k, v in generation_config.items()}


def with_defaults(fields: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """fields with each default filled in where the request gave none (None: not given)."""
    return {**fields, **{k: v for k, v in defaults.items() if fields.get(k) is None}}


def log_sampling_defaults(defaults: dict[str, Any], source: str) -> None:
    """The start-up line saying which request defaults the generation config set, if any."""
    if defaults:
        logger.info("default sampling params from %s: %s (a request's own values win; --generation-config vllm "
                    "ignores the model's)", source, ", ".join(f"{k}={v}" for k, v in defaults.items()))


def api_sampling_defaults(engine_config: EngineConfig, log: bool) -> dict[str, Any]:
    """The API server's request defaults: the generation config's but
    max_tokens, which the input processor fills in from the core's info, capped by the context a prompt
    leaves (engine.serve logs it). log: the start-up line (API process 0)."""
    from engine.model_config import generation_defaults  # it imports this module

    generation, source = generation_defaults(engine_config)
    defaults = {k: v for k, v in sampling_defaults(generation).items() if k != "max_tokens"}
    if log:
        log_sampling_defaults(defaults, source)
    return defaults
