"""LLMEngine: requests in, RequestOutputs out, one scheduling step at a time (rank 0).

add_request validates and queues; step() schedules, runs the model through the executor,
appends sampled tokens, detokenizes, applies stop conditions and frees finished sequences.
A request whose own processing raises fails alone (RequestOutput.error); the rest of the batch goes on.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import ConfigError, EngineConfig
from engine.errors import RequestError
from engine.executor import UniprocExecutor
from engine.model_config import resolve_model_config
from engine.model_runner import ModelRunner
from engine.output_processor import check_stop_strings, failed_output, make_output
from engine.outputs import Logprob, ModelRunnerOutput, PromptLogprobsChunk, RequestMetrics, RequestOutput, SchedulerOutput
from engine.parallel import get_parallel_state, init_distributed
from engine.prompt_logprobs import extend_prompt_logprobs
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request, Sequence, SequenceStatus
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

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
            self.num_lanes, self.async_scheduling,
        )
        self.in_flight: deque[tuple[SchedulerOutput, list[Sequence], int]] = deque()
        self.requests: dict[str, Request] = {}
        self.seqs: dict[str, Sequence] = {}
        self._finished_outputs: list[RequestOutput] = []  # aborted/unschedulable, reported at the next step
        self.prompt_tokens_total = self.generation_tokens_total = 0
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

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        with self.lock:
            if request_id in self.requests:
                raise RequestError("request_id", f"request {request_id!r} is already running")
            if isinstance(prompt, str):
                prompt_text, token_ids = prompt, self.encode(prompt)
            else:
                token_ids = list(prompt)
                prompt_text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else None
            self._validate(token_ids, params)
            num_prompt = len(token_ids)
            # no max_tokens: the model's generation_config default (as vLLM), else the context left
            default = self.model_config.default_max_tokens or self.max_model_len
            max_tokens = min(params.max_tokens or default, self.max_model_len - num_prompt)
            metrics = RequestMetrics(arrival_time=arrival_time or time.time())
            request = Request(request_id, prompt_text, token_ids, params, metrics, max_tokens)
            if params.prompt_logprobs is not None:
                request.prompt_logprobs = [None]  # nothing predicts the first prompt token
            for i in range(params.n):
                seq_id = request_id if params.n == 1 else f"{request_id}#{i}"
                seq = Sequence(seq_id, request, i, list(token_ids), num_prompt)
                if self.tokenizer is not None and params.detokenize:
                    seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
                request.seqs.append(seq)
            # registered only once everything above succeeded: a refused request leaves no trace
            for seq in request.seqs:
                self.seqs[seq.seq_id] = seq
                self.scheduler.add(seq)
            self.requests[request_id] = request

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
        with self.lock:
            for request_id in [request_ids] if isinstance(request_ids, str) else list(request_ids):
                request = self.requests.get(request_id)
                if request is None:
                    continue
                request.aborted = True
                live = [s for s in request.seqs if not s.is_finished]
                for seq in live:
                    seq.finish_reason = "abort"
                self.scheduler.finish(live)
                self._finish_request(request)
                try:
                    self._finished_outputs.append(make_output(request))
                except Exception as e:  # the request is already freed: report it failed
                    self._finished_outputs.append(self._fail_request(request, e))

    def has_unfinished_requests(self) -> bool:
        with self.lock:
            return bool(self.requests) or bool(self._finished_outputs) or bool(self.in_flight)

    # ---- one step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and submit one batch (if a lane is free), and collect the oldest batch's
        tokens once max_in_flight batches are in flight (at once when that is one)."""
        with self.lock:
            outputs, self._finished_outputs = self._finished_outputs, []
            submitted = False
            if len(self.in_flight) < self.max_in_flight:
                busy = {lane for _, _, lane in self.in_flight} if self.num_lanes > 1 else set()
                lane = min(set(range(self.num_lanes)) - busy)
                so, scheduled = self.scheduler.schedule(lane)
                for seq in self.scheduler.unschedulable:
                    capacity = self.block_manager.num_blocks * self.config.block_size
                    error = RequestError("max_tokens", f"the request needs more than the whole KV cache "
                                                       f"({capacity} tokens) for one sample")
                    outputs.append(self._fail_request(seq.request, error))
                self.scheduler.unschedulable.clear()
                if so.num_scheduled_tokens or so.finished_req_ids:
                    self._count_prompt_tokens(so, scheduled)
                    self.executor.submit(so)
                    self.in_flight.append((so, scheduled, lane))
                    submitted = True
            if self.in_flight and (len(self.in_flight) == self.max_in_flight or not submitted):
                so, scheduled, _ = self.in_flight.popleft()
                result = self.executor.collect()
                self.scheduler.update_after_step(scheduled)
                outputs.extend(self._process_result(result))
            return outputs

    def _count_prompt_tokens(self, so: SchedulerOutput, scheduled: list[Sequence]) -> None:
        now = time.time()
        for seq in scheduled:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
            end = seq.num_computed_tokens  # the scheduler has counted this step's tokens already
            start = end - so.num_scheduled_tokens[seq.seq_id]
            self.prompt_tokens_total += max(0, min(seq.num_prompt_tokens, end) - start)

    def _process_result(self, result: ModelRunnerOutput) -> list[RequestOutput]:
        touched: dict[Request, None] = {}  # ordered, so outputs come in batch order
        failed: list[RequestOutput] = []
        now = time.time()
        if result.prompt_logprobs:  # before the tokens: a request's first output has them all
            failed += self._add_prompt_logprobs(result.prompt_logprobs)
        for i, (seq_id, token_id) in enumerate(zip(result.req_ids, result.sampled_token_ids)):
            seq = self.seqs.get(seq_id)
            if seq is None or seq.status != SequenceStatus.RUNNING:
                continue  # finished, aborted or preempted while its batch was in flight
            seq.num_placeholders -= 1
            try:
                self._append_token(seq, token_id, result.logprobs[i] if result.logprobs else None)
            except Exception as e:  # detokenizer, stop check...: this request fails, the batch goes on
                touched.pop(seq.request, None)
                failed.append(self._fail_request(seq.request, e))
                continue
            metrics = seq.request.metrics
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
            touched[seq.request] = None
        return failed + self._after_seq_update(touched)

    def _append_token(self, seq: Sequence, token_id: int, logprobs: tuple[list[int], list[float], int] | None) -> None:
        seq.token_ids.append(token_id)
        self.generation_tokens_total += 1
        params = seq.params
        if logprobs is not None:
            ids, lps, rank = logprobs
            entry = {tid: Logprob(lp, r, self._decode_one(tid)) for r, (tid, lp) in enumerate(zip(ids[1:], lps[1:]), 1)}
            entry[token_id] = Logprob(lps[0], rank, self._decode_one(token_id))
            seq.output_logprobs.append(entry)
            seq.cumulative_logprob += lps[0]
        num_output = seq.num_output_tokens
        stops_on_token = num_output >= params.min_tokens and (
            (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids
        )
        if stops_on_token:
            seq.finish_reason = "stop"
            seq.stop_reason = token_id if token_id in params.stop_token_ids else None
        elif seq.detokenizer is not None:
            old_len = len(seq.text)
            seq.text += seq.detokenizer.add_tokens([token_id])
            if params.stop and num_output >= params.min_tokens:
                check_stop_strings(seq, old_len)
        if seq.finish_reason is None and (num_output >= seq.request.max_tokens or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
                seq.text += seq.detokenizer.flush()
            self.scheduler.finish([seq])

    def _add_prompt_logprobs(self, chunks: dict[str, PromptLogprobsChunk]) -> list[RequestOutput]:
        """File prompt logprobs by position; a prompt recomputed after preemption repeats some.
        Returns the outputs of requests that failed doing so (each fails alone)."""
        failed = []
        for seq_id, (first, entries) in chunks.items():
            seq = self.seqs.get(seq_id)
            if seq is None or seq.status != SequenceStatus.RUNNING:
                continue  # finished, aborted, or preempted in flight (it recomputes what it lacks)
            try:
                extend_prompt_logprobs(seq.request.prompt_logprobs, first, entries, self.tokenizer)
            except Exception as e:
                failed.append(self._fail_request(seq.request, e))
        return failed

    def _decode_one(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

    def _after_seq_update(self, requests: Iterable[Request]) -> list[RequestOutput]:
        outputs = []
        for request in requests:
            if request.finished:
                self._finish_request(request)
            elif not self.stream_outputs:
                continue
            try:
                outputs.append(make_output(request))
            except Exception as e:
                outputs.append(self._fail_request(request, e))
        return outputs

    def _fail_request(self, request: Request, error: Exception) -> RequestOutput:
        """End a request that failed inside the engine, alone: free its sequences wherever they
        are and report it finished with `error` (the other requests in the batch go on)."""
        if isinstance(error, RequestError):
            logger.warning("request %s failed: %s", request.request_id, error)
        else:
            logger.error("request %s failed inside the engine; ending it alone", request.request_id,
                         exc_info=error)
        live = [s for s in request.seqs if not s.is_finished]
        for seq in live:
            seq.finish_reason = "abort"
        self.scheduler.finish(live)
        self._finish_request(request)
        return failed_output(request, error)

    def _finish_request(self, request: Request) -> None:
        request.metrics.finished_time = time.time()
        self.requests.pop(request.request_id, None)
        for seq in request.seqs:
            self.seqs.pop(seq.seq_id, None)

    def get_stats(self) -> EngineStats:
        with self.lock:
            running = {s.request.request_id for s in self.scheduler.running}
            waiting = {s.request.request_id for s in self.scheduler.waiting} - running
            bm = self.block_manager
            return EngineStats(
                num_running=len(running), num_waiting=len(waiting), kv_cache_usage=bm.usage,
                num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
                num_preemptions_total=self.scheduler.num_preemptions,
                prefix_cache_queries_total=bm.prefix_cache_queries, prefix_cache_hits_total=bm.prefix_cache_hits,
                prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            )

    def shutdown(self) -> None:
        """Collect batches still in flight, then release the other ranks."""
        with self.lock:
            while self.in_flight:
                self.in_flight.popleft()
                self.executor.collect()
            self.executor.shutdown()
