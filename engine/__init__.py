"""Gantry's inference engine: paged KV cache, continuous batching, prefix caching, TP/PP."""
from engine.config import EngineConfig, ServerConfig
from engine.llm import LLM
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "EngineConfig", "ServerConfig"]
