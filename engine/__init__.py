"""Gantry's inference engine: paged KV cache, continuous batching, prefix caching, TP/PP.

The public names load lazily, so `import engine.config` (the launcher, on a login node)
does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "SamplingParams": "engine.sampling_params",
    "BeamSearchParams": "engine.beam_search",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "EngineConfig": "engine.config",
    "ServerConfig": "engine.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
