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

import torch

from engine.block_manager import BlockManager
from engine.config import ConfigError, EngineConfig
from engine.core_client import EngineCoreClient, InprocClient
from engine.core_messages import EngineCoreRequest
from engine.engine_core import EngineCore
from engine.errors import RequestError
from engine.executor import UniprocExecutor
from engine.model_config import resolve_model_config
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor, RequestState
from engine.outputs import CompletionOutput, RequestOutput
from engine.parallel import get_parallel_state, init_distributed
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.tokenizer import load_tokenizer

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
    prompt_tokens_total: int  # prompt tokens computed (cache hits excluded)
    generation_tokens_total: int


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


class LLMEngine:
    def __init__(self, config: EngineConfig, show_progress: bool = True):
        self.config = config
        self.lock = threading.RLock()  # the server's loop thread and request handlers share the engine
        self.device = resolve_device(config)
        init_distributed(config.tensor_parallel_size, config.pipeline_parallel_size, self.device, config.distributed_timeout_s)
        self.model_config = mc = resolve_model_config(config, self.device)
        self.max_model_len = mc.max_model_len
        self.model_name = mc.served_model_name
        self.tokenizer = load_tokenizer(mc.tokenizer, mc.tokenizer_is_gguf, required=mc.load_format != "dummy")
        self.eos_token_ids = self._eos_token_ids()
        is_driver = get_parallel_state().is_driver
        runner = ModelRunner(config, mc, self.device, show_progress and is_driver)
        if get_parallel_state().world_size > 1:
            from engine.distributed import MultiprocExecutor

            self.executor: UniprocExecutor | MultiprocExecutor = MultiprocExecutor(runner)
        else:
            self.executor = UniprocExecutor(runner)
        num_blocks = self.executor.determine_num_blocks()
        if num_blocks < 1:
            raise ConfigError("gpu_memory_utilization", "no memory left for the KV cache after loading the weights")
        self._check_pool_holds_max_model_len(num_blocks)
        self.executor.allocate_kv_cache(num_blocks)
        gib = num_blocks * runner.kv_bytes_per_block() / 2**30
        logger.info("model %s (%s, %s) loaded", self.model_name, mc.architecture, str(mc.dtype).replace("torch.", ""))
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB per rank", num_blocks, config.block_size,
                    num_blocks * config.block_size, gib)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(8192, config.block_size)
        # with pipeline parallel, one batch in flight per stage keeps every stage busy
        self.num_lanes = config.pipeline_parallel_size if config.pipeline_parallel_lanes is None else config.pipeline_parallel_lanes
        self.async_scheduling = config.async_scheduling
        if self.async_scheduling is None:
            self.async_scheduling = self.device.type == "cuda" and config.world_size == 1
        # batches in flight at once: one per PP lane; two with async scheduling (the GPU runs one
        # while the CPU schedules the next and processes the previous one's tokens)
        self.max_in_flight = self.num_lanes if self.num_lanes > 1 else 2 if self.async_scheduling else 1
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, self.max_num_batched_tokens, sorted(self.eos_token_ids),
            self.num_lanes, self.async_scheduling, self.max_model_len,
        )
        self.engine_core = EngineCore(self.scheduler, self.executor, self.max_in_flight)
        self.client: EngineCoreClient = InprocClient(self.engine_core)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._finished_outputs: list[RequestOutput] = []  # aborted/unschedulable, reported at the next step
        self.stream_outputs = True  # False: step() reports requests only when they finish (offline API)
        # Everything built so far (model, tokenizer, CUDA graphs) lives as long as the engine: keep
        # it out of the collector's full passes, which would otherwise stall a step for tens of ms.
        gc.collect()
        gc.freeze()

    def _check_pool_holds_max_model_len(self, num_blocks: int) -> None:
        """Refuse to start (like vLLM) when one max_model_len sequence cannot fit in the KV pool:
        such a request would pass validation and then never be scheduled."""
        capacity = num_blocks * self.config.block_size
        if capacity < self.max_model_len:
            raise ConfigError(
                "max_model_len", f"{self.max_model_len} tokens do not fit in the KV cache, which holds {capacity} "
                f"tokens ({num_blocks} blocks of {self.config.block_size}); the largest max_model_len that fits is "
                f"{capacity}. Lower max_model_len, or make the cache larger with num_kv_blocks, kv_cache_memory_gib "
                "or gpu_memory_utilization"
            )

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model_config.hf_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        gen_config = os.path.join(self.model_config.path, "generation_config.json")
        if os.path.isfile(gen_config):
            import json

            with open(gen_config, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- requests --------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise RequestError("prompt", "this model has no tokenizer (load_format=dummy): give token ids")
        return self.tokenizer.encode(prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise RequestError("messages", "this model has no chat template")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages", "must be a non-empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise RequestError(f"messages[{i}].role", "must be one of system, user, assistant, tool, developer")
            if not isinstance(m.get("content"), (str, list)) and m.get("content") is not None:
                raise RequestError(f"messages[{i}].content", "must be a string or a list of content parts")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as e:  # jinja errors from the model's own template
            raise RequestError("messages", f"the chat template rejected the messages: {e}") from None
        return self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def requests(self) -> dict[str, RequestState]:
        """The requests not finished yet, as the output processor holds them."""
        return self.output_processor.requests

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        with self.lock:
            if request_id in self.requests or request_id in self.engine_core.requests:
                raise RequestError("request_id", f"request {request_id!r} is already running")
            if isinstance(prompt, str):
                prompt_text, token_ids = prompt, self.encode(prompt)
            else:
                token_ids = list(prompt)
                prompt_text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else None
            self._validate(token_ids, params)
            # no max_tokens: the model's generation_config default (as vLLM), else the context left
            default = self.model_config.default_max_tokens or self.max_model_len
            max_tokens = min(params.max_tokens or default, self.max_model_len - len(token_ids))
            arrival_time = arrival_time or time.time()
            # registered only once everything above succeeded: a refused request leaves no trace
            self.output_processor.add_request(request_id, prompt_text, token_ids, params, arrival_time)
            self.client.add_request(EngineCoreRequest(request_id=request_id, prompt_token_ids=token_ids,
                                                      sampling_params=params, max_tokens=max_tokens,
                                                      arrival_time=arrival_time))

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise RequestError("prompt", "the prompt is empty")
        vocab = self.model_config.hf_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise RequestError("prompt", f"token ids must be integers in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(
                "prompt", f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len}, which leaves no room to generate"
            )
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > self.max_model_len:
            raise RequestError(
                "max_tokens", f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(token_ids)} prompt tokens + max_tokens {params.max_tokens} exceed it"
            )
        if params.n > self.config.max_num_seqs:
            raise RequestError("n", f"must be at most max_num_seqs ({self.config.max_num_seqs}), got {params.n}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise RequestError("stop_token_ids", f"token ids must be in [0, {vocab})")
        capacity = self.block_manager.num_blocks * self.config.block_size
        if len(token_ids) + 1 > capacity:
            raise RequestError("prompt", f"the prompt does not fit in the whole KV cache ({capacity} tokens)")
        if len(token_ids) + (params.max_tokens or 0) > capacity:
            raise RequestError("max_tokens", f"{len(token_ids)} prompt tokens + max_tokens {params.max_tokens} do "
                                             f"not fit in the whole KV cache ({capacity} tokens)")

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
            processed = self.output_processor.process_outputs(core_outputs.outputs)
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
            self.client.shutdown()
