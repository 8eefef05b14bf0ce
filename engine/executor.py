"""Executor: runs a SchedulerOutput on every rank and returns the sampled tokens to rank 0.

UniprocExecutor is the single-process case; engine/distributed.py adds the multi-rank one.
"""
from __future__ import annotations

from engine.model_runner import ModelRunner
from engine.outputs import ModelRunnerOutput, SchedulerOutput


class UniprocExecutor:
    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def submit(self, so: SchedulerOutput) -> None:
        self._result = self.runner.execute_model(so)

    def collect(self) -> ModelRunnerOutput:
        out, self._result = self._result, None
        assert out is not None
        return out

    def shutdown(self) -> None:
        pass
