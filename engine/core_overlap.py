"""The engine core's steps whose host work overlaps the device's, under async scheduling in one process.

A deep prompt chunk is prepared before the step in flight is collected and launched after it
(_collect_then_launch). Under grammars, a step's forward is queued before its bitmask is filled, as vLLM
and SGLang overlap it, and the next step is scheduled while a worker thread fills it (_step_pipelined;
GANTRY_PIPELINED_STEP=0: _step_overlapping_bitmask, the fill on the loop's thread).
"""
from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

from engine.core_messages import EngineCoreOutput, EngineCoreOutputs
from engine.outputs import SchedulerOutput
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.structured.manager import StructuredOutputManager


class PhaseTimer:
    """Host seconds per named phase of a step, summed over steps: mark(name) closes the phase that
    began at start() or at the previous mark."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        t = time.perf_counter()
        self.seconds[name] += t - self._t
        self._t = t


class OverlappedSteps:
    """EngineCore's overlapped steps, mixed into EngineCore (a helper object holding the core would be a
    reference cycle, never collected after gc.freeze()). They use the core's state declared here and its
    _schedule, _outputs and _has_grammars; the executor has the split submits (prepare_forward,
    launch_forward, submit_forward, submit_sample)."""

    scheduler: Scheduler
    executor: Any
    max_in_flight: int
    batch_queue: deque[tuple[SchedulerOutput, list[Sequence], int]]
    structured_output_manager: StructuredOutputManager | None
    _forwarded: tuple[SchedulerOutput, list[Sequence]] | None
    bitmask_fill_steps: int
    phases: PhaseTimer

    def _collect_then_launch(self, so: SchedulerOutput, scheduled: list[Sequence], lane: int) -> EngineCoreOutputs:
        """A step with a deep prompt chunk: its inputs are prepared, the step in flight is collected, and only then
        is it launched. Queued behind the step in flight, its hundreds of launches would fill CUDA's launch queue
        and block until that step had nearly run, so that step's tokens would reach their streams late (120K
        prompt beside 32 streams: ITL p99 163-171 ms against device steps of at most 108 ms). The device waits
        only for the first launch after the collect."""
        self.executor.prepare_forward(so)
        done_so, done_scheduled, _ = self.batch_queue.popleft()
        result = self.executor.collect()
        self.executor.launch_forward()
        self.executor.submit_sample(so)
        self.batch_queue.append((so, scheduled, lane))
        return self._outputs(self.scheduler.update_from_output(done_so, done_scheduled, result))

    def _step_overlapping_bitmask(self) -> EngineCoreOutputs:
        """Async scheduling under grammars: queue step t+1's forward (placeholders as usual), collect
        step t and advance the matchers with its tokens, then fill t+1's bitmask and queue its sampler.
        The CPU fills the bitmask while the device runs the forward, which does not need it. A sample
        that finished at step t gets a row that allows everything (its t+1 token is dropped)."""
        phases = self.phases
        phases.start()
        nxt = None
        if len(self.batch_queue) < self.max_in_flight and self.scheduler.has_unfinished():
            so, scheduled = self._schedule(0, with_bitmask=False)
            phases.mark("schedule")
            if so.num_scheduled_tokens or so.finished_req_ids:
                self.executor.submit_forward(so)
                nxt = (so, scheduled)
            phases.mark("submit_forward")
        outputs: list[EngineCoreOutput] = []
        if self.batch_queue:  # at most one: every call leaves at most one step in flight
            so_t, scheduled_t, _ = self.batch_queue.popleft()
            result = self.executor.collect()
            phases.mark("collect")
            outputs = self.scheduler.update_from_output(so_t, scheduled_t, result)
            phases.mark("update")
            if outputs:
                self.structured_output_manager.accept_tokens(outputs)
            phases.mark("accept")
        if nxt is not None:
            so, scheduled = nxt
            self._fill_bitmask(so, scheduled)
            phases.mark("fill")
            self.executor.submit_sample(so)
            self.batch_queue.append((so, scheduled, 0))
            phases.mark("submit_sample")
        result = self._outputs(outputs, accepted=True)
        phases.mark("outputs")
        return result

    def _step_pipelined(self) -> EngineCoreOutputs:
        """_step_overlapping_bitmask with the host work off the device's path. On entry step t is queued
        and step t+1's forward too (self._forwarded). Collect t and advance the matchers; then a worker
        fills t+1's bitmask while this thread schedules step t+2 and prepares its inputs; then sampler
        t+1 and forward t+2 are queued back to back, and t's outputs built while they run. Leaves a
        forward queued while anything is left to schedule; a later call samples it, grammars or not."""
        phases = self.phases
        phases.start()
        if self._forwarded is None and self.scheduler.has_unfinished():  # entering: queue step t+1's forward
            self._forwarded = self._schedule_and_prepare()
            if self._forwarded is not None:
                self.executor.launch_forward()
            phases.mark("launch_forward")
        outputs: list[EngineCoreOutput] = []
        if self.batch_queue:  # at most one: every call leaves at most one step sampling
            so_t, scheduled_t, _ = self.batch_queue.popleft()
            result = self.executor.collect()
            phases.mark("collect")
            outputs = self.scheduler.update_from_output(so_t, scheduled_t, result)
            phases.mark("update")
            if outputs and self._has_grammars():
                self.structured_output_manager.accept_tokens(outputs)
            phases.mark("accept")
        fill = None
        if self._forwarded is not None and self._has_grammars():
            fill = self.structured_output_manager.start_grammar_bitmask(self._forwarded[1])
            phases.mark("fill_start")
        nxt = None  # without grammars the plain async path queues two whole steps (more slack for the host)
        if self._forwarded is not None and self.scheduler.has_unfinished() and self._has_grammars():
            nxt = self._schedule_and_prepare()
            phases.mark("prepare")
        if self._forwarded is not None:
            so, scheduled = self._forwarded
            if fill is not None:
                so.grammar_bitmask, so.structured_output_req_ids = fill.result()
                self.bitmask_fill_steps += 1
                phases.mark("fill_wait")
            self.executor.submit_sample(so)
            self.batch_queue.append((so, scheduled, 0))
            phases.mark("submit_sample")
        self._forwarded = nxt
        if nxt is not None:
            self.executor.launch_forward()  # and step t+2's sampling metadata, while its forward runs
            phases.mark("launch_forward")
        result = self._outputs(outputs, accepted=True)
        phases.mark("outputs")
        return result

    def _schedule_and_prepare(self) -> tuple[SchedulerOutput, list[Sequence]] | None:
        """Schedule the next step and prepare its inputs on the host (executor.launch_forward queues it);
        None when there is nothing to run."""
        so, scheduled = self._schedule(0, with_bitmask=False)
        self.phases.mark("schedule")
        if not (so.num_scheduled_tokens or so.finished_req_ids):
            return None
        self.executor.prepare_forward(so)
        return so, scheduled

    def _fill_bitmask(self, so: SchedulerOutput, scheduled: list[Sequence]) -> None:
        """so's grammar rows: every matcher of `scheduled` must have taken its sample's tokens."""
        so.grammar_bitmask, so.structured_output_req_ids = self.structured_output_manager.grammar_bitmask(scheduled)
        self.bitmask_fill_steps += 1
