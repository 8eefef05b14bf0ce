"""Data that crosses boundaries: RequestOutput (engine -> user), SchedulerOutput
(rank 0 -> every rank) and ModelRunnerOutput (last pipeline stage -> rank 0).

SchedulerOutput and ModelRunnerOutput hold plain Python data only (lists, numbers, slotted
dataclasses and msgspec Structs that pickle as tuples), so they pickle small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.core_messages import TokenLogprobs
from engine.lora.request import LoRARequest


@dataclass
class Logprob:
    logprob: float  # natural log of the token's probability under the model (before sampling transforms)
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None  # the token's text


# One position: token id -> Logprob (the sampled token plus the top-k).
SampleLogprobs = list[dict[int, Logprob]]
# Per prompt token: the same for the prompt's own token; None for the first, which nothing predicts.
PromptLogprobs = list[dict[int, Logprob] | None]


class _PicklesPositionally:
    """Pickles a slotted dataclass as (class, field values): these cross ranks every step, and
    the default pickle of a slotted class names every field (3x the bytes, 2x the time)."""

    __slots__ = ()

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        return type(self), tuple(getattr(self, name) for name in self.__slots__)


@dataclass(slots=True)
class PromptLogprobsChunk(_PicklesPositionally):
    """One request's prompt logprobs computed in one step (a prefill chunk)."""

    first_position: int  # prompt index of the first token scored (>= 1: nothing predicts token 0)
    entries: list[TokenLogprobs]  # one per prompt token scored: the prompt's token first, then the top k


@dataclass
class CompletionOutput:
    index: int  # which of the request's n samples
    text: str  # generated text so far (complete UTF-8 characters only)
    token_ids: list[int]  # generated token ids so far
    cumulative_logprob: float | None  # sum of sampled tokens' logprobs (None unless logprobs asked)
    logprobs: SampleLogprobs | None  # per generated token, when logprobs were asked
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float  # time.time() when the request was added
    first_scheduled_time: float | None = None  # when it first ran (queue time = this - arrival)
    first_token_time: float | None = None  # when its first token was sampled
    last_token_time: float | None = None  # when its latest token was sampled
    finished_time: float | None = None  # when it finished


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt text (decoded when token ids were given)
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]  # cumulative, one per sample
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # set when the request failed inside the engine (finished, its samples "abort"): a RequestError
    # naming the field when the request itself is at fault, else the internal error
    error: Exception | None = None
    prompt_logprobs: PromptLogprobs | None = None  # when SamplingParams.prompt_logprobs was asked
    lora_request: LoRARequest | None = None  # the adapter it ran with (vLLM's; set by the offline LLM)


@dataclass(slots=True)
class RequestSamplingParams(_PicklesPositionally):
    """What a model runner needs to sample for one sequence (one sample of a request), resolved by
    the scheduler from its SamplingParams (engine.scheduler.request_sampling_params). Sent once, in
    NewRequestData, to every rank; the runner batches these into the sampler's SamplingMetadata."""

    temperature: float  # 0 = greedy
    top_k: int  # 0: off (larger than the vocabulary: off too)
    top_p: float  # in (0, 1]; 1 = off
    min_p: float  # 0 = off
    seed: int | None  # this sample's own seed (the request's mixed with the sample index); None: unseeded
    presence_penalty: float  # OpenAI's, over generated tokens
    frequency_penalty: float  # OpenAI's, over generated tokens
    repetition_penalty: float  # HF's, over prompt and generated tokens
    has_penalties: bool  # any of the three is not neutral: the runner counts this sequence's tokens
    min_tokens: int  # stop_token_ids and eos_token_ids are masked until this many are generated
    stop_token_ids: list[int]  # masked under min_tokens (the scheduler checks them as stops)
    eos_token_ids: list[int]  # the model's EOS ids, masked under min_tokens
    logprobs: int | None  # top-k logprobs to return per sampled token; None: none
    prompt_logprobs: int | None  # top-k per prompt token, while this sequence still owes them; None: none
    num_prompt_tokens: int  # tokens of the prompt; the rest of the sequence's tokens are output
    logit_bias: dict[int, float] | None = None  # token id -> added to its raw logit; None: none
    allowed_token_ids: list[int] | None = None  # only these may be sampled; None: any
    bad_words_token_ids: list[list[int]] | None = None  # each one's last token masked after its prefix; None: none


@dataclass
class NewRequestData:
    req_id: str  # sequence id (one per sample)
    prompt_token_ids: list[int]  # every token known so far (prompt, plus output after preemption)
    block_ids: list[int]  # pages allocated to it
    num_computed_tokens: int  # tokens whose KV is already in the pages (prefix cache hits)
    sampling_params: RequestSamplingParams
    lora_request: LoRARequest | None = None  # its adapter (None: the base model)


@dataclass
class CachedRequestData:
    req_id: str
    new_token_ids: list[int]  # tokens sampled last step that rank > 0 has not seen
    new_block_ids: list[int]  # pages appended since last step
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)  # first run (or resumed)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)  # ran last step too
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # req_id -> tokens this step
    finished_req_ids: list[str] = field(default_factory=list)  # forget these (finished, aborted, preempted)
    # [len(structured_output_req_ids), ceil(vocab / 32)] int32 host tensor: the tokens each constrained
    # sample may take next (engine/structured/); None when no constrained sample is scheduled
    grammar_bitmask: Any = None
    structured_output_req_ids: list[str] = field(default_factory=list)  # seq ids of grammar_bitmask's rows
    # a prompt chunk of DEEP_CHUNK_TOKENS or more new tokens at least DEEP_CHUNK_START deep is in it
    # (engine/scheduler.py): hundreds of kernel launches, so the engine core collects the step in flight first
    has_deep_chunk: bool = False

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]  # requests that sampled a token this step (prefill chunks that end mid-prompt do not)
    sampled_token_ids: list[int]  # one per req_id
    # per req_id: the sampled token then the top k, and its rank (None for requests that did not ask);
    # None when no request in the step asked
    logprobs: list[TokenLogprobs | None] | None = None
    # req_id -> prompt logprobs computed this step (requests that asked for them)
    prompt_logprobs: dict[str, PromptLogprobsChunk] | None = None
