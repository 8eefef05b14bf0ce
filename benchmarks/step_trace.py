"""Where an in-process engine's steps spend their time, for benchmarks: host milliseconds per phase
(the methods named, timed wherever they are called) and, on a GPU, the device's time of every step (CUDA
events queued when runner.prepare_forward starts and after its launch_forward or submit_sample: every
in-process path, the engine core's split ones included), by patching one engine's methods until close();
and Driver, the engine's own step loop with a time stamp per new token of each request.

    trace = StepTrace(llm.llm_engine, phases=StepTrace.PHASES, label=lambda so: ...)
    ... engine.step() ...; trace.take_phases()  # {"schedule": ms, ...} since the last take
    trace.close(); trace.device_steps()  # [(label, device ms, device idle ms before the next step), ...]
"""
from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from typing import Any

import torch

# (owner, method): owner is "scheduler", "executor", "runner" or "output_processor" of the engine
Phases = tuple[tuple[str, str], ...]


class StepTrace:
    # a step's host work, from scheduling through launching to processing the tokens
    PHASES: Phases = (("scheduler", "schedule"), ("runner", "prepare_forward"), ("runner", "launch_forward"),
                      ("runner", "submit_sample"), ("executor", "collect"), ("scheduler", "update_from_output"),
                      ("output_processor", "process_outputs"))

    def __init__(self, engine: Any, phases: Phases = PHASES, label: Callable[[Any], Any] | None = None) -> None:
        runner = getattr(engine.executor, "runner", None)  # None: the ranks run in other processes
        owners = {"scheduler": engine.scheduler, "executor": engine.executor, "runner": runner,
                  "output_processor": engine.output_processor}
        self.phases: dict[str, float] = collections.defaultdict(float)  # host ms per phase since take_phases()
        self._label = label or (lambda so: None)
        self._events: list[list] = []  # [label, start event, end event] per step, the end moved as it queues more
        self._open: dict[int, tuple[Any, list]] = {}  # id of a step's PreparedStep or StepLogits -> (it, its entry)
        self._patched: list[tuple[Any, str]] = []
        wrappers: dict[tuple[int, str], tuple[Any, Callable]] = {}  # (id(owner), method) -> (owner, wrapped method)

        def wrap(obj: Any, name: str, make: Callable[[Callable], Callable]) -> None:
            _, fn = wrappers.get((id(obj), name), (obj, getattr(obj, name)))
            wrappers[(id(obj), name)] = (obj, make(fn))

        for owner, name in phases:
            obj = owners[owner]
            if obj is not None and hasattr(obj, name):
                wrap(obj, name, lambda fn, name=name: self._timed(name, fn))
        if runner is not None and torch.cuda.is_available():
            wrap(runner, "prepare_forward", self._step_start)
            wrap(runner, "launch_forward", lambda fn: self._step_end(fn, samples_next=True))
            wrap(runner, "submit_sample", lambda fn: self._step_end(fn, samples_next=False))
        for (_, name), (obj, fn) in wrappers.items():
            assert name not in vars(obj), f"{name} is already patched"
            setattr(obj, name, fn)
            self._patched.append((obj, name))

    def _timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] += 1e3 * (time.perf_counter() - t0)
        return wrapper

    def _step_start(self, prepare: Callable) -> Callable:
        def wrapper(so):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            entry = [self._label(so), start, None]
            self._events.append(entry)
            step = prepare(so)
            self._open[id(step)] = (step, entry)  # launch_forward gets this step
            return step
        return wrapper

    def _step_end(self, fn: Callable, samples_next: bool) -> Callable:
        """launch_forward(step) or submit_sample(logits, ...): the end of the entry its argument belongs to moves
        past the work it queued; launch_forward's logits (StepLogits) are what submit_sample gets next."""
        from engine.runner_output import StepLogits

        def wrapper(item, *args, **kwargs):
            _, entry = self._open.pop(id(item), (None, None))
            out = fn(item, *args, **kwargs)
            if entry is not None:
                entry[2] = torch.cuda.Event(enable_timing=True)
                entry[2].record()
                if samples_next and isinstance(out, StepLogits):
                    self._open[id(out)] = (out, entry)  # held until sampled, so that its id is not reused
            return out
        return wrapper

    def take_phases(self) -> dict[str, float]:
        """Host ms per phase since the last take, then zero."""
        taken = dict(self.phases)
        self.phases.clear()
        return taken

    def close(self) -> None:
        """Put the engine's own methods back (the instance attributes go: no bound method keeps a cycle)."""
        for obj, name in reversed(self._patched):
            delattr(obj, name)
        self._patched.clear()

    def device_steps(self) -> list[tuple[Any, float, float]]:
        """(label, device ms from the step's first queued work to its last, device ms before the next step's
        start) per step; waits for the device. A host stall while a step is prepared or launched counts as device
        time: the start event is queued before its inputs are prepared."""
        if self._events:
            torch.cuda.synchronize()
        steps = []
        events = [e for e in self._events if e[2] is not None]  # steps launched (one prepared last may not be)
        for i, (tag, start, end) in enumerate(events):
            idle = end.elapsed_time(events[i + 1][1]) if i + 1 < len(events) else 0.0
            steps.append((tag, start.elapsed_time(end), idle))
        return steps


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


class Driver:
    """The engine's own step loop with a perf_counter stamp per new token of each request."""

    def __init__(self, engine) -> None:
        self.engine = engine
        engine.stream_outputs = True  # step() returns every request that got tokens, not only finished ones
        self.arrival: dict[str, float] = {}
        self.stamps: dict[str, list[float]] = {}  # request id -> one time per output token
        self.finished: set[str] = set()

    def add(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        from engine import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        self.stamps[request_id] = []
        self.finished.discard(request_id)  # an id used again (the mixed part once per budget): running again
        self.arrival[request_id] = time.perf_counter()
        self.engine.add_request(request_id, prompt, params)

    def step(self) -> None:
        outputs = self.engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.error is not None:
                raise SystemExit(f"request {out.request_id} failed: {out.error}")
            stamps = self.stamps.get(out.request_id)
            if stamps is None:
                continue
            stamps.extend([now] * (len(out.outputs[0].token_ids) - len(stamps)))
            if out.finished:
                self.finished.add(out.request_id)

    def run_until(self, done: Callable[[], bool]) -> int:
        steps = 0
        while not done():
            if not self.engine.has_unfinished_requests():
                raise SystemExit("the engine ran out of work before the benchmark's condition held")
            self.step()
            steps += 1
        return steps

    def ttft(self, request_id: str) -> float:
        return self.stamps[request_id][0] - self.arrival[request_id]

    def drain(self, request_ids: list[str]) -> None:
        """Abort what is still running among request_ids and step until the engine is idle."""
        self.engine.abort_request([r for r in request_ids if r not in self.finished])
        while self.engine.has_unfinished_requests():
            self.step()
