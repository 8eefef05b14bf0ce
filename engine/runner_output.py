"""What ModelRunner hands back for a step: a PreparedStep between its host part and its launch
(prepare_forward -> launch_forward), StepLogits between its forward and its sampler
(submit_forward -> submit_sample), then a PendingOutput, its tokens on their way to the host."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.core_messages import TokenLogprobs
from engine.forward_context import ForwardContext
from engine.layers.sampler import SamplingMetadata
from engine.lora.punica import LoRABatch
from engine.outputs import ModelRunnerOutput, PromptLogprobsChunk
from engine.parallel import wait_for_event
from engine.prompt_logprobs import PromptLogprobsPlan


@dataclass
class PendingOutput:
    """A step's sampled tokens on their way to the host: copies queued behind the step, and an
    event to wait on, so the CPU can prepare the next step while this one runs."""

    req_ids: list[str]
    sampled: torch.Tensor  # [num_reqs] int64, host (pinned when on CUDA)
    logprob_parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # ids, logprobs, ranks
    num_logprobs: list[int | None]  # per request: top-k asked (None: no logprobs)
    event: torch.cuda.Event | None
    prompt_logprobs: dict[str, PromptLogprobsChunk] | None = None  # already on the host

    @staticmethod
    def empty(prompt_logprobs: dict[str, PromptLogprobsChunk] | None = None) -> PendingOutput:
        """A step that sampled nothing (prefill chunks that end mid-prompt)."""
        return PendingOutput([], torch.empty(0, dtype=torch.long), None, [], None, prompt_logprobs)

    def get(self) -> ModelRunnerOutput:
        if self.event is not None:
            wait_for_event(self.event)
        token_ids = self.sampled.tolist()
        logprobs = None
        if self.logprob_parts is not None:
            ids, lps, ranks = (t.tolist() for t in self.logprob_parts)
            logprobs = [None if k is None else TokenLogprobs(ids[i][: k + 1], lps[i][: k + 1], ranks[i])
                        for i, k in enumerate(self.num_logprobs)]
        return ModelRunnerOutput(self.req_ids, token_ids, logprobs, self.prompt_logprobs)


@dataclass
class StepLogits:
    """A step whose forward is queued and whose sampler is not yet (submit_forward -> submit_sample)."""

    logits: torch.Tensor  # [num_sampled, vocab] on the device
    metadata: SamplingMetadata  # built before this step's placeholders were appended
    sampled_ids: list[str]  # the requests of the logits' rows
    prompt_logprobs: dict[str, PromptLogprobsChunk] | None
    num_logprobs: list[int | None]  # per sampled request: top-k asked (None: no logprobs)


@dataclass
class PreparedStep:
    """A step's inputs queued to the device, its forward not yet (prepare_forward -> launch_forward)."""

    input_ids: torch.Tensor  # [num_tokens] int64; placeholder positions filled at launch
    positions: torch.Tensor  # [num_tokens] int64
    ctx: ForwardContext
    sampled_ids: list[str]  # requests that sample this step, in logits row order
    feed: tuple[torch.Tensor, torch.Tensor] | None  # (input positions, rows of last_sampled): placeholders
    plan: PromptLogprobsPlan | None  # prompt logprobs to compute from this step's hidden states
    lora: LoRABatch | None  # None: no adapter in this step
