"""Request and Sequence: one request holds n sequences (parallel samples) that share its prompt.

A sequence's token_ids are prompt + output; num_computed_tokens counts the tokens whose K/V
are in its pages or are being computed by a step in flight. With async scheduling a step can be
scheduled before the previous one's token is known: that token is a placeholder (counted in
num_placeholders) which the model runner fills on the GPU. Prefill, chunked prefill, decode and recompute after preemption are all
"compute tokens num_computed_tokens.. up to num_tokens".
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engine.lora.request import LoRARequest
from engine.outputs import RequestMetrics
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    seq_id: str  # request_id for n=1, else "request_id#index"
    request: Request
    index: int  # which of the request's n samples
    token_ids: list[int]
    num_prompt_tokens: int
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    block_table: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    lane: int = 0  # pipeline batch lane (pp > 1 keeps one batch per lane in flight)
    num_in_flight: int = 0  # scheduled steps whose results have not come back yet
    num_placeholders: int = 0  # tokens those steps are sampling (not in token_ids yet)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id (stop strings are the output processor's)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the next step may compute: 1 for a decode (its newest token, maybe a placeholder), more
        for a prompt part-way through its prefill."""
        return len(self.token_ids) + self.num_placeholders - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def needs_prompt_logprobs(self) -> bool:
        """The request asked for prompt logprobs that are not all in yet; its first sample computes them."""
        return (self.index == 0 and self.params.prompt_logprobs is not None
                and self.request.num_prompt_logprobs < self.num_prompt_tokens)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    max_tokens: int  # params.max_tokens, or what the context length leaves
    seqs: list[Sequence] = field(default_factory=list)
    num_prompt_logprobs: int = 1  # prompt positions scored so far (the scheduler's count; 0 has none)
    scheduled_time_sent: bool = False  # the engine core told its client metrics.first_scheduled_time
    lora_request: LoRARequest | None = None  # its adapter (None: the base model)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
