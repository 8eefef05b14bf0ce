"""Executor: runs a SchedulerOutput on every rank and returns the sampled tokens to rank 0.

UniprocExecutor is the single-process case; engine/distributed.py adds the multi-rank one.
"""
from __future__ import annotations

from collections import deque

from engine.model_runner import ModelRunner, PendingOutput
from engine.outputs import ModelRunnerOutput, SchedulerOutput


class UniprocExecutor:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.pending: deque[PendingOutput] = deque()  # two with async scheduling

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def submit(self, so: SchedulerOutput) -> None:
        """Queue the step on the device; returns before it has run."""
        pending = self.runner.submit_model(so)
        assert pending is not None
        self.pending.append(pending)

    def collect(self) -> ModelRunnerOutput:
        """Wait for the oldest submitted step's tokens."""
        return self.pending.popleft().get()

    def shutdown(self) -> None:
        pass
