"""LLMEngine: requests in, RequestOutputs out, one scheduling step at a time (rank 0).

Orchestration only: add_request tokenizes and validates, then hands an EngineCoreRequest to the
engine core through its client; step() takes one EngineCoreOutputs from it and the output
processor turns it into RequestOutputs (samples it stops on a stop string are aborted in the core).
A request whose own processing raises fails alone (RequestOutput.error); the rest of the batch goes on.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engine.config import EngineConfig
from engine.core_build import build_engine_core, resolve_device
from engine.core_client import EngineCoreClient, InprocClient
from engine.errors import RequestError
from engine.input_processor import InputProcessor
from engine.lora.registry import LoRARegistry
from engine.lora.request import LoRARequest
from engine.output_processor import OutputProcessor, RequestState
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.spawn import ensure_group, failures_named
from engine.tokenizer import apply_chat_template, check_encoded_ids, load_tokenizer, warn_if_beyond_vocab

__all__ = ["EngineStats", "LLMEngine", "resolve_device"]

logger = logging.getLogger("gantry.engine")


@dataclass
class EngineStats:
    num_running: int  # requests with a sequence running
    num_waiting: int  # requests waiting for their first schedule (or after preemption)
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions_total: int
    prefix_cache_queries_total: int  # tokens looked up in the prefix cache
    prefix_cache_hits_total: int  # tokens found there
    prompt_tokens_total: int  # every prompt token of every request, cache hits included (vLLM's)
    generation_tokens_total: int


class LLMEngine:
    def __init__(self, config: EngineConfig, show_progress: bool = True):
        self.config = config
        self.lock = threading.RLock()  # the server's loop thread and request handlers share the engine
        self.worker_group = ensure_group(config)  # ranks 1.. spawned here when no launcher (torchrun) did
        with failures_named(self.worker_group):
            build = build_engine_core(config, show_progress)
        if self.worker_group is not None:  # released by the core's shutdown, with this engine or at exit
            self.worker_group.attach(self, build.core.shutdown)
        self.engine_core, self.info = build.core, build.info
        self.device, self.model_config = build.device, build.model_config
        mc = build.model_config
        self.max_model_len = mc.max_model_len
        self.model_name = mc.served_model_name
        self.tokenizer = load_tokenizer(mc.tokenizer, mc.tokenizer_is_gguf, required=mc.load_format != "dummy",
                                        trust_remote_code=config.trust_remote_code)
        warn_if_beyond_vocab(self.tokenizer, self.info.vocab_size)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.engine_core.add_eos_token_ids([self.tokenizer.eos_token_id])
        self.client: EngineCoreClient = InprocClient(self.engine_core)
        self.input_processor = InputProcessor(self.info, self.tokenizer, serving_defaults=False,
                                              max_logprobs=config.max_logprobs)
        # lora_modules' names and headers; build_engine_core's registry has read their weights
        self.lora_registry = LoRARegistry(config, mc.hf_config, mc.served_model_name, check_values=False)
        # lora_int_id -> the adapter that first came with it: the core caches adapters, and the prefix cache
        # keys pages, by that id alone, so another directory under a used id would silently run the first one
        self._adapters_by_id: dict[int, LoRARequest] = {r.lora_int_id: r for r in self.lora_registry.by_name.values()}
        self.output_processor = OutputProcessor(self.tokenizer)
        self._finished_outputs: list[RequestOutput] = []  # aborted/unschedulable, reported at the next step
        self.stream_outputs = True  # False: step() reports requests only when they finish (offline API)
        # Everything built so far (model, tokenizer, CUDA graphs) lives as long as the engine: keep
        # it out of the collector's full passes, which would otherwise stall a step for tens of ms.
        gc.collect()
        gc.freeze()

    # the core's parts, for tests and benchmarks
    @property
    def scheduler(self):
        return self.engine_core.scheduler

    @property
    def block_manager(self):
        return self.engine_core.block_manager

    @block_manager.setter
    def block_manager(self, block_manager) -> None:  # a test's smaller pool
        self.engine_core.scheduler.block_manager = block_manager
        self.info.num_total_blocks = block_manager.num_blocks  # what requests are checked against

    @property
    def executor(self):
        return self.engine_core.executor

    @property
    def max_in_flight(self) -> int:
        return self.engine_core.max_in_flight

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.scheduler.eos_token_ids)

    # ---- requests --------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("prompt", "this model has no tokenizer (load_format=dummy): give token ids")
        token_ids = self.tokenizer.encode(prompt)
        check_encoded_ids(token_ids, self.info.vocab_size, "prompt")
        return token_ids

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, *, continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None, chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        """One conversation's prompt token ids; the options are vLLM's LLM.chat's (engine.tokenizer)."""
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages", "must be a non-empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise RequestError(f"messages[{i}].role", "must be one of system, user, assistant, tool, developer")
            if not isinstance(m.get("content"), (str, list)) and m.get("content") is not None:
                raise RequestError(f"messages[{i}].content", "must be a string or a list of content parts")
        messages = [_with_text_content(m, i) for i, m in enumerate(messages)]
        token_ids = apply_chat_template(
            self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, chat_template=chat_template,
            chat_template_kwargs=chat_template_kwargs)
        check_encoded_ids(token_ids, self.info.vocab_size, "messages")
        return token_ids

    @property
    def requests(self) -> dict[str, RequestState]:
        """The requests not finished yet, as the output processor holds them."""
        return self.output_processor.requests

    def add_request(
        self, request_id: str, prompt: str | list[int] | dict[str, Any], params: SamplingParams,
        arrival_time: float | None = None, lora_request: LoRARequest | None = None,
    ) -> None:
        """prompt: any of vLLM's forms, as LLM.generate takes one ({"prompt": ...} and {"prompt_token_ids": ...}
        too; a dict was read as its keys and refused as bad token ids)."""
        if isinstance(prompt, dict):
            from engine.llm import _parse_prompt  # engine.llm imports this module

            prompt = _parse_prompt(prompt, "prompt")
        with self.lock:
            if request_id in self.requests or request_id in self.engine_core.requests:
                raise RequestError("request_id", f"request {request_id!r} is already running")
            taken = self.engine_core.sample_id_taken(request_id, params.n)
            if taken is not None:
                raise RequestError("request_id", f"request {request_id!r}: its sample id {taken!r} is a running "
                                                 f"request's (n > 1 samples are named request_id#index)")
            token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            arrival_time = arrival_time or time.time()
            self._check_lora_int_id(lora_request)
            self.lora_registry.check(lora_request)
            request = self.input_processor.process(request_id, token_ids, params, arrival_time, lora_request=lora_request)
            # token ids are decoded once checked: the tokenizer overflows on ids out of the int64 range
            prompt_text = prompt if isinstance(prompt, str) else (
                self.tokenizer.decode(token_ids) if self.tokenizer is not None else None)
            # registered only once everything above succeeded: a refused request leaves no trace
            self.output_processor.add_request(request_id, prompt_text, token_ids, params, arrival_time)
            self.client.add_request(request)
            if lora_request is not None:
                self._adapters_by_id.setdefault(lora_request.lora_int_id, lora_request)

    def _check_lora_int_id(self, lora: LoRARequest | None) -> None:
        """Refuse an adapter whose lora_int_id already names another directory (vLLM's contract: one id per
        adapter); the same directory under another name is the same adapter."""
        if not isinstance(lora, LoRARequest):  # None, or a wrong type the registry names
            return
        known = self._adapters_by_id.get(lora.lora_int_id)
        if known is not None and os.path.realpath(known.lora_path) != os.path.realpath(lora.lora_path):
            raise RequestError("lora_request.lora_int_id", f"{lora.lora_int_id} already names adapter "
                               f"{known.lora_name!r} ({known.lora_path}); give each adapter its own lora_int_id")

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Free these requests in the core; each one's final output ("abort") comes with the next step."""
        with self.lock:
            ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
            self.client.abort_requests(ids)
            for request_id in ids:
                state = self.requests.pop(request_id, None)
                if state is None:
                    continue
                state.metrics.finished_time = time.time()
                outputs = [CompletionOutput(s.index, s.text, s.token_ids, None, None, s.finish_reason or "abort",
                                            s.stop_reason) for s in state.samples]
                self._finished_outputs.append(RequestOutput(
                    request_id, state.prompt, state.prompt_token_ids, outputs, True, state.metrics,
                    num_cached_tokens=state.num_cached_tokens, prompt_logprobs=state.prompt_logprobs))

    def has_unfinished_requests(self) -> bool:
        with self.lock:
            return bool(self.requests) or bool(self._finished_outputs) or self.engine_core.has_work()

    # ---- one step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One step of the engine core, its outputs turned into RequestOutputs."""
        with self.lock:
            outputs, self._finished_outputs = self._finished_outputs, []
            core_outputs = self.client.get_output()
            processed = self.output_processor.process_outputs(core_outputs.outputs, final_only=not self.stream_outputs)
            if processed.samples_to_abort:  # stopped by a stop string, or failed in the output processor
                self.client.abort_requests(processed.samples_to_abort)
            for out in processed.request_outputs:
                if out.error is not None:
                    self._log_failure(out.request_id, out.error)
                if out.finished or self.stream_outputs:
                    outputs.append(out)
            return outputs

    def _log_failure(self, request_id: str, error: Exception) -> None:
        if isinstance(error, RequestError):
            logger.warning("request %s failed: %s", request_id, error)
        else:
            logger.error("request %s failed inside the engine; ending it alone", request_id, exc_info=error)

    def get_stats(self) -> EngineStats:
        with self.lock:
            st = self.client.get_stats()
            return EngineStats(
                num_running=st.num_running, num_waiting=st.num_waiting, kv_cache_usage=st.kv_cache_usage,
                num_free_blocks=st.num_free_blocks, num_total_blocks=st.num_total_blocks,
                num_preemptions_total=st.num_preemptions_total, prefix_cache_queries_total=st.prefix_cache_queries_total,
                prefix_cache_hits_total=st.prefix_cache_hits_total, prompt_tokens_total=st.prompt_tokens_total,
                generation_tokens_total=st.generation_tokens_total,
            )

    def shutdown(self) -> None:
        """Collect batches still in flight, then release the other ranks."""
        with self.lock:
            (self.worker_group.shutdown if self.worker_group is not None else self.client.shutdown)()


def _with_text_content(message: dict[str, Any], i: int) -> dict[str, Any]:
    """message with a list of OpenAI content parts joined into one text (newline-separated), as vLLM renders
    them for a template that takes string content and as the API server does; the caller's dict is left as is."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" and message.get("role") == "assistant" else "text"
        if kind != key or not isinstance(part.get(key), str):
            got = kind if kind is not None else type(part).__name__
            raise RequestError(f"messages[{i}].content[{j}]",
                               f"only parts of type 'text' with a string 'text' are supported (a text model), got {got!r}")
        texts.append(part[key])
    return {**message, "content": "\n".join(texts)}
