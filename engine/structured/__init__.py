"""Structured outputs: generation constrained by a JSON schema, regex, choice list or EBNF grammar.

params.py: StructuredOutputsParams (vLLM's shape), checked when SamplingParams is built.
manager.py: the engine core's grammars and per-sample matchers, and each step's token bitmask.
bitmask.py: the bitmask rows of one step applied to the logits on their device.
"""
from engine.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
