"""Offline API with vLLM's names: LLM(...).generate(prompts, sampling_params) and .chat(...)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]
Conversation = list[dict[str, Any]]


def _show_engine_logs() -> None:
    """Offline users see the engine's info lines (model loaded, KV pool size) as vLLM users do,
    unless the application configured logging itself."""
    logger = logging.getLogger("gantry")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class LLM:
    """LLM(model=None) serves the embedded SmolLM2-135M-Instruct; keyword arguments are
    EngineConfig fields (dtype, max_model_len, block_size, gpu_memory_utilization, ...)."""

    def __init__(self, model: str | None = None, **kwargs: Any):
        known = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown argument {unknown[0]!r}; known: {', '.join(sorted(known))}")
        _show_engine_logs()
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.llm_engine.stream_outputs = False  # generate() returns finished requests only
        self._counter = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | SequenceABC[Prompt],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm)

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.llm_engine.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(
        self, prompts: list[Prompt], sampling_params: SamplingParams | SequenceABC[SamplingParams] | None, use_tqdm: bool
    ) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params: {len(params_list)} given for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = []
        try:
            for prompt, params in zip(prompts, params_list):
                request_id = str(next(self._counter))
                engine.add_request(request_id, prompt, params)
                ids.append(request_id)
        except Exception:
            engine.abort_request(ids)
            engine.step()
            raise
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while len(finished) < len(ids):
                for output in engine.step():
                    if output.finished and output.request_id in ids:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids]
