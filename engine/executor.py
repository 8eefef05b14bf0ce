"""Executor: runs a SchedulerOutput on every rank and returns the sampled tokens to rank 0.

UniprocExecutor is the single-process case; engine/distributed.py adds the multi-rank one.
UniprocExecutor can also queue a step's forward and its sampler separately (submit_forward,
submit_sample), so the engine core fills a grammar bitmask while the forward runs, and prepare a
step's inputs before the previous step's sampler is queued (prepare_forward, launch_forward).
"""
from __future__ import annotations

from collections import deque

from engine.model_runner import ModelRunner, PendingOutput, PreparedStep, StepLogits
from engine.outputs import ModelRunnerOutput, SchedulerOutput


class UniprocExecutor:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.pending: deque[PendingOutput] = deque()  # two with async scheduling
        self.forwarded: StepLogits | PendingOutput | None = None  # submit_forward's, until submit_sample
        self.prepared: PreparedStep | PendingOutput | None = None  # prepare_forward's, until launch_forward

    def determine_num_blocks(self) -> int:
        return self.runner.determine_num_blocks()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def submit(self, so: SchedulerOutput) -> None:
        """Queue the step on the device; returns before it has run."""
        pending = self.runner.submit_model(so)
        assert pending is not None
        self.pending.append(pending)

    def submit_forward(self, so: SchedulerOutput) -> None:
        """Queue the step's forward (and logits) on the device; submit_sample(so) must follow
        before the next submit, and the steps submitted before it can be collected meanwhile."""
        assert self.forwarded is None, "submit_sample of the previous step is missing"
        self.forwarded = self.runner.submit_forward(so)
        assert self.forwarded is not None

    def prepare_forward(self, so: SchedulerOutput) -> None:
        """submit_forward's host part (the inputs); it may come before the previous step's submit_sample,
        and launch_forward after it."""
        assert self.prepared is None, "launch_forward of the previous step is missing"
        self.prepared = self.runner.prepare_forward(so)
        assert self.prepared is not None

    def launch_forward(self) -> None:
        """Queue the forward prepare_forward prepared: submit_forward's device part."""
        assert self.forwarded is None, "submit_sample of the previous step is missing"
        prepared, self.prepared = self.prepared, None
        self.forwarded = self.runner.launch_forward(prepared)
        assert self.forwarded is not None

    def submit_sample(self, so: SchedulerOutput) -> None:
        """Queue the sampler of the step submit_forward queued, under so.grammar_bitmask as it is now."""
        forwarded, self.forwarded = self.forwarded, None
        if isinstance(forwarded, StepLogits):
            forwarded = self.runner.submit_sample(forwarded, so.grammar_bitmask, so.structured_output_req_ids)
        assert forwarded is not None, "submit_forward first"
        self.pending.append(forwarded)

    def collect(self) -> ModelRunnerOutput:
        """Wait for the oldest submitted step's tokens."""
        return self.pending.popleft().get()

    def shutdown(self) -> None:
        self.pending.clear()
        self.forwarded = self.prepared = None
        self.runner.release()
