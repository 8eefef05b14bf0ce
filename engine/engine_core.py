"""EngineCore: the scheduler, the KV block manager and the executor, and nothing of text.

Requests come in tokenized and validated (EngineCoreRequest); each step returns one
EngineCoreOutputs with the new tokens of every sample that got some. Stepping is chosen once:
step() (one batch at a time) or step_with_batch_queue() (async scheduling, or one batch per
pipeline lane in flight), which keeps one deque of (SchedulerOutput, scheduled, lane). The steps
whose host work overlaps the device's (a deep prompt chunk, grammars' bitmasks) are in core_overlap.py.
"""
from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from engine.core_messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, SchedulerStats
from engine.core_overlap import OverlappedSteps, PhaseTimer
from engine.lora.request import count_adapters
from engine.outputs import ModelRunnerOutput, RequestMetrics, SchedulerOutput
from engine.scheduler import Scheduler
from engine.sequence import Request, Sequence
from engine.structured.manager import StructuredOutputManager
from engine.structured.params import StructuredOutputsError


READ_WAIT_S = 0.01  # the longest a step with nothing to run waits for an adapter read or a grammar compile


def sample_ids(request_id: str, n: int) -> list[str]:
    """Its samples' sequence ids: the request id for one sample, else "request_id#index"."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class Executor(Protocol):
    """What the core needs of an executor (UniprocExecutor, MultiprocExecutor)."""

    def submit(self, so: SchedulerOutput) -> None: ...
    def collect(self) -> ModelRunnerOutput: ...
    def shutdown(self) -> None: ...


class EngineCore(OverlappedSteps):
    def __init__(self, scheduler: Scheduler, executor: Executor, max_in_flight: int = 1, engine_index: int = 0):
        self.scheduler, self.executor = scheduler, executor
        self.max_in_flight, self.engine_index = max_in_flight, engine_index
        self.requests: dict[str, Request] = {}
        self.batch_queue: deque[tuple[SchedulerOutput, list[Sequence], int]] = deque()
        self._pending: list[EngineCoreOutput] = []  # requests failed outside a step, sent with the next
        self.use_batch_queue = max_in_flight > 1  # chosen once at start-up (see step_fn)
        self._structured_output_manager: StructuredOutputManager | None = None  # set by build_engine_core
        self.max_lora_rank: int | None = None  # with enable_lora (build_engine_core): adapters' files checked on arrival
        # rank 0's LoRAManager (this process's): adapters a step could not read again, whose requests fail here
        self.lora_manager = getattr(getattr(executor, "runner", None), "lora_manager", None)
        self.lora_prefetcher = None  # reads adapters off this loop from their requests' arrival (lora/prefetch.py)
        if self.lora_manager is not None:
            from engine.lora.prefetch import AdapterPrefetcher

            self.lora_prefetcher = AdapterPrefetcher(self.lora_manager)
            scheduler.lora_ready = self.lora_prefetcher.ready
        # fill step t+1's bitmask while its forward runs: needs the executor's split submit (one
        # process), one lane and two steps in flight; a test may turn it off to compare
        self.overlap_bitmask = (max_in_flight == 2 and scheduler.num_lanes == 1
                                and callable(getattr(executor, "submit_forward", None)))
        self.bitmask_fill_steps = 0  # steps that filled a bitmask (benchmarks; the CPU seconds: the manager's fill_s)
        # split submits (prepare_forward, launch_forward, submit_sample): the in-process executor's
        self.can_prepare = callable(getattr(executor, "prepare_forward", None))
        # under overlap_bitmask: schedule and prepare step t+2 while a thread fills t+1's bitmask (A/B: "0" off)
        self.pipelined = os.environ.get("GANTRY_PIPELINED_STEP", "1") != "0" and self.can_prepare
        self._forwarded: tuple[SchedulerOutput, list[Sequence]] | None = None  # forward queued, sampler not yet
        self.phases = PhaseTimer()  # host seconds per phase of the overlapped step (benchmarks)

    def step_fn(self) -> EngineCoreOutputs:
        """step() or step_with_batch_queue(), as chosen at start-up. A method, not a bound method kept
        in an attribute: that would be a reference cycle, and after gc.freeze() a cycle is never
        collected, so a deleted engine would keep its weights and KV pool."""
        return self.step_with_batch_queue() if self.use_batch_queue else self.step()

    @property
    def block_manager(self):  # the scheduler's (a test may swap it)
        return self.scheduler.block_manager

    @property
    def structured_output_manager(self) -> StructuredOutputManager | None:
        return self._structured_output_manager

    @structured_output_manager.setter
    def structured_output_manager(self, manager: StructuredOutputManager | None) -> None:
        """The manager, and its ready() as the scheduler's grammar_ready: a request waits while its grammar compiles."""
        self._structured_output_manager = manager
        self.scheduler.grammar_ready = None if manager is None else manager.ready

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request the client has validated; its samples share the prompt's pages."""
        if req.request_id in self.requests:
            raise ValueError(f"request {req.request_id!r} is already in the engine core")
        params = req.sampling_params
        request = Request(req.request_id, None, req.prompt_token_ids, params, RequestMetrics(req.arrival_time),
                          req.max_tokens, lora_request=req.lora_request)
        for i, seq_id in enumerate(sample_ids(req.request_id, params.n)):
            request.seqs.append(Sequence(seq_id, request, i, list(req.prompt_token_ids), len(req.prompt_token_ids)))
        if req.lora_request is not None and self.max_lora_rank is not None:
            from engine.lora.adapter import LoRAError, check_adapter_files

            try:
                check_adapter_files(req.lora_request.lora_path, self.max_lora_rank, "model")
            except LoRAError as e:  # removed or changed since it was registered: this request fails alone
                self._report_failed(request, (e.param, e.message))
                return
            if self.lora_prefetcher is not None:  # its requests wait for the read; the running streams go on
                self.lora_prefetcher.start(req.lora_request)
        if params.structured_outputs is not None:
            try:
                if self.structured_output_manager is None:
                    raise StructuredOutputsError("structured_outputs", "not supported by this engine")
                # compiled on the manager's worker: its samples wait, the running streams go on (_schedule collects)
                self.structured_output_manager.start_request(request, self.scheduler.eos_token_ids)
            except StructuredOutputsError as e:  # the request fails alone, with the field named
                self._report_failed(request, (e.param, e.message))
                return
        self.requests[req.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def sample_id_taken(self, request_id: str, n: int) -> str | None:
        """A sample id of a new request (request_id, n samples) that a live request's sample has, else None:
        "a" with n=2 has samples "a#0" and "a#1", the id of a request "a#1" (n=1) too, and two sequences under
        one id would share the runners' state and pages (both requests hung)."""
        for seq_id in sample_ids(request_id, n):
            other = self.requests.get(seq_id)
            if other is not None and other.params.n == 1:
                return seq_id
            base, _, index = seq_id.rpartition("#")
            other = self.requests.get(base) if base else None
            if other is not None and other.params.n > 1 and index.isdigit() and int(index) < other.params.n:
                return seq_id
        return None

    def abort_requests(self, request_ids: Iterable[str | tuple[str, int]]) -> None:
        """Free these requests (an id) or samples ((id, index); index -1: all) wherever they are;
        unknown or finished ones are ignored. The client asked, so nothing is reported back."""
        for item in request_ids:
            request_id, index = (item, -1) if isinstance(item, str) else item
            request = self.requests.get(request_id)
            if request is None:
                continue
            seqs = request.seqs if index < 0 else request.seqs[index : index + 1]
            live = [s for s in seqs if not s.is_finished]
            for seq in live:
                seq.finish_reason = "abort"
            self.scheduler.finish(live)
            if request.finished:
                del self.requests[request_id]
                self._free_grammar(request_id)

    def add_eos_token_ids(self, token_ids: Iterable[int]) -> None:
        """The tokenizer's EOS (the front end's to know): a stop token for every request from now on."""
        sched = self.scheduler
        sched.eos_token_ids = sorted(set(sched.eos_token_ids) | set(token_ids))
        sched.eos_token_id_set = frozenset(sched.eos_token_ids)

    def has_work(self) -> bool:
        return bool(self.requests or self.batch_queue or self._pending or self._forwarded)

    # ---- stepping ------------------------------------------------------------------------

    def step(self) -> EngineCoreOutputs:
        """Schedule one batch, run it, and return what it produced."""
        self._collect_inputs()
        if not self.scheduler.has_unfinished():
            return self._outputs([])
        so, scheduled = self._schedule(0)
        if not (so.num_scheduled_tokens or so.finished_req_ids):
            return self._outputs([])
        self.executor.submit(so)
        return self._outputs(self.scheduler.update_from_output(so, scheduled, self.executor.collect()))

    def step_with_batch_queue(self) -> EngineCoreOutputs:
        """Submit a batch while a slot (a PP lane, or the second async slot) is free; collect the
        oldest once the queue is full or nothing new could be scheduled."""
        self._collect_inputs()
        submitted = False
        if self._forwarded is not None or (self.overlap_bitmask and self.pipelined and self._has_grammars()):
            return self._step_pipelined()
        if self.overlap_bitmask and self._has_grammars():
            return self._step_overlapping_bitmask()
        if self.batch_queue and self.scheduler.num_lanes == 1 and self._has_grammars():
            # A constrained sample's next bitmask needs the token its step in flight is sampling; without
            # the split submit (several ranks) the overlap is off: collect, then schedule (as step()).
            # The alternative, running constrained samples every other step, would halve their speed.
            so, scheduled, _ = self.batch_queue.popleft()
            return self._outputs(self.scheduler.update_from_output(so, scheduled, self.executor.collect()))
        if len(self.batch_queue) < self.max_in_flight and self.scheduler.has_unfinished():
            busy = {lane for _, _, lane in self.batch_queue}
            free = [lane for lane in range(self.scheduler.num_lanes) if lane not in busy]
            lane = free[0] if free else 0
            so, scheduled = self._schedule(lane)
            if so.num_scheduled_tokens or so.finished_req_ids:
                if so.has_deep_chunk and self.batch_queue and self.scheduler.num_lanes == 1 and self.can_prepare:
                    return self._collect_then_launch(so, scheduled, lane)
                self.executor.submit(so)
                self.batch_queue.append((so, scheduled, lane))
                submitted = True
        if self.batch_queue and (len(self.batch_queue) == self.max_in_flight or not submitted):
            so, scheduled, _ = self.batch_queue.popleft()
            return self._outputs(self.scheduler.update_from_output(so, scheduled, self.executor.collect()))
        return self._outputs([])

    def _collect_inputs(self) -> None:
        """Adapters read and grammars compiled off the loop since the last step: their requests may run from this
        one (collected before the step chooses its path, which depends on whether grammars are live); a grammar
        that failed to compile fails its request alone."""
        if self.lora_prefetcher is not None:
            self.lora_prefetcher.collect()
        som = self.structured_output_manager
        if som is not None and som.compiling:
            for request, error in som.collect():
                if request.request_id in self.requests:
                    self._fail(request, error)

    def _schedule(self, lane: int, with_bitmask: bool = True) -> tuple[SchedulerOutput, list[Sequence]]:
        som = self.structured_output_manager
        so, scheduled = self.scheduler.schedule(lane)
        if not scheduled and not self.batch_queue and self._forwarded is None:
            # nothing runs but adapters are read or grammars compiled: wait for one, not spin against them
            if self.lora_prefetcher is not None and self.lora_prefetcher.reads:
                self.lora_prefetcher.wait(READ_WAIT_S)
            elif som is not None and som.compiling:
                som.wait(READ_WAIT_S)
        if with_bitmask and self._has_grammars():
            self._fill_bitmask(so, scheduled)
        now = time.time()
        for seq in scheduled:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        if self.scheduler.unschedulable:
            capacity = self.block_manager.num_blocks * self.block_manager.block_size
            for seq in self.scheduler.unschedulable:
                request = self.requests.get(seq.request.request_id)
                if request is not None:
                    self._fail(request, ("max_tokens", f"the request needs more than the whole KV cache ({capacity} "
                                                       "tokens) for one sample"))
            self.scheduler.unschedulable.clear()
        return so, scheduled

    def _fail(self, request: Request, error: tuple[str, str]) -> None:
        """End a request the core holds, every sample, with an error naming the field (sent with the next outputs)."""
        del self.requests[request.request_id]
        self._free_grammar(request.request_id)
        live = [s for s in request.seqs if not s.is_finished]
        for s in live:
            s.finish_reason = "abort"
        self.scheduler.finish(live)
        self._report_failed(request, error)

    def _report_failed(self, request: Request, error: tuple[str, str]) -> None:
        """Every sample of request ends with error (param, message), sent with the next outputs."""
        self._pending.extend(EngineCoreOutput(request_id=request.request_id, index=s.index, finish_reason="abort",
                                              error=error) for s in request.seqs)

    def _fail_unreadable_adapters(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        """Requests whose adapter a step could not read again (its files removed or spoiled since they arrived; its
        rows ran on the base model) fail alone, naming model and the file; their tokens are dropped."""
        failed = self.lora_manager.take_failed()
        doomed = [r for r in self.requests.values() if r.lora_request is not None
                  and r.lora_request.lora_int_id in failed]
        for request in doomed:
            e = failed[request.lora_request.lora_int_id]
            self._fail(request, (e.param, e.message))
        ids = {r.request_id for r in doomed}
        return [o for o in outputs if o.request_id not in ids]

    def _fail_refused(self, outputs: list[EngineCoreOutput], refused: list[tuple[str, int, tuple[str, str]]]) -> None:
        """Samples whose grammar allowed no token (their refused token is in this step's outputs) end there with
        an error naming the field, which fails the request at the client."""
        failed = {(request_id, index): error for request_id, index, error in refused}
        for out in outputs:
            error = failed.get((out.request_id, out.index))
            request = self.requests.get(out.request_id)
            if error is None or request is None:
                continue
            seq = request.seqs[out.index]
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish([seq])
            out.finish_reason, out.error = "abort", error

    def _has_grammars(self) -> bool:
        return self.structured_output_manager is not None and self.structured_output_manager.num_requests > 0

    def _free_grammar(self, request_id: str) -> None:
        if self.structured_output_manager is not None:
            self.structured_output_manager.free(request_id)

    def _outputs(self, outputs: list[EngineCoreOutput], accepted: bool = False) -> EngineCoreOutputs:
        """accepted: the matchers have taken these tokens already."""
        if self.lora_manager is not None and self.lora_manager.failed:
            outputs = self._fail_unreadable_adapters(outputs)
        if outputs and not accepted and self._has_grammars():
            self.structured_output_manager.accept_tokens(outputs)
        if self.structured_output_manager is not None and self.structured_output_manager.refused:
            self._fail_refused(outputs, self.structured_output_manager.take_refused())
        for out in outputs:
            request = self.requests.get(out.request_id)
            if request is None:
                continue
            if not request.scheduled_time_sent:  # the client's queue-time metric
                out.first_scheduled_time, request.scheduled_time_sent = request.metrics.first_scheduled_time, True
            if out.finish_reason is not None and request.finished:  # forgotten once all samples finished
                del self.requests[out.request_id]
                self._free_grammar(out.request_id)
        if self._pending:
            outputs, self._pending = self._pending + outputs, []
        return EngineCoreOutputs(outputs=outputs, timestamp=time.time(), stats=self.get_stats(),
                                 engine_index=self.engine_index)

    def get_stats(self) -> SchedulerStats:
        sched, bm = self.scheduler, self.block_manager
        running = {s.request.request_id for s in sched.running}
        waiting = {s.request.request_id for s in sched.waiting} - running
        return SchedulerStats(
            num_running=len(running), num_waiting=len(waiting), kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
            num_preemptions_total=sched.num_preemptions, prefix_cache_queries_total=bm.prefix_cache_queries,
            prefix_cache_hits_total=bm.prefix_cache_hits, prompt_tokens_total=sched.prompt_tokens_total,
            generation_tokens_total=sched.generation_tokens_total, num_steps=sched.num_steps,
            # the watchdog's: a request that only waits for a compile or an adapter read is no step overdue
            has_work=self.has_work() and not (self.scheduler.only_waits_for_inputs() and not self.batch_queue
                                             and self._forwarded is None and not self._pending),
            **({} if sched.max_loras is None else self._lora_stats(running, waiting)),
        )

    def _lora_stats(self, running: set[str], waiting: set[str]) -> dict[str, object]:
        """vLLM's lora_requests_info: requests per adapter name, running and waiting."""
        def count(ids: set[str]) -> dict[str, int]:
            return count_adapters(getattr(self.requests.get(r), "lora_request", None) for r in ids)

        return dict(max_lora=self.scheduler.max_loras, running_lora_adapters=count(running),
                    waiting_lora_adapters=count(waiting))

    def shutdown(self) -> None:
        """Collect batches still in flight, then release the executor (and the other ranks)."""
        if self.lora_prefetcher is not None:
            self.lora_prefetcher.shutdown()
        if self.structured_output_manager is not None:
            self.structured_output_manager.shutdown()
        if self._forwarded is not None:  # a queued forward: its sampler too, so that every step is collected
            so, scheduled = self._forwarded
            self.executor.submit_sample(so)
            self.batch_queue.append((so, scheduled, 0))
            self._forwarded = None
        while self.batch_queue:
            self.batch_queue.popleft()
            self.executor.collect()
        self.executor.shutdown()
        self.lora_manager = None  # the runner's: its adapter buffers and CUDA graphs go with the runner
