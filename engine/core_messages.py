"""What crosses between the engine core and its clients (API processes, offline LLM).

msgspec Structs, array-like and without defaults on the wire, so one step's outputs for every
request is one small message. Token ids and logprobs only: the core holds no tokenizer, the
client decodes. The same objects travel in-process (InprocClient) without encoding.
"""
from __future__ import annotations

import msgspec

from engine.lora.request import LoRARequest
from engine.sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "CoreInfo", "EngineCoreOutput", "EngineCoreOutputs", "EngineCoreRequest", "FinishReason", "RequestOutputKind",
    "SchedulerStats", "TokenLogprobs", "decoder_for", "encoder",
]

# "stop" (EOS, stop token or stop string), "length" (max_tokens or the context) or "abort"
FinishReason = str


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """A request as the core sees it: tokenized, validated, max_tokens resolved."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # sampling_params.max_tokens, or what the context or generation config leaves
    arrival_time: float
    client_index: int = 0  # which API process sent it (its outputs go back there)
    lora_request: LoRARequest | None = None  # the adapter it runs with (None: the base model)


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprobs at one position: the chosen token first, then the top k; rank of the chosen token."""

    token_ids: list[int]  # [chosen, top1, ..., topk]
    logprobs: list[float]  # natural log, same order
    rank: int  # 1 = the most likely token


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """What one sample of one request got in one step (a delta: nothing already sent)."""

    request_id: str
    index: int = 0  # which of the request's n samples
    new_token_ids: list[int] = []
    new_logprobs: list[TokenLogprobs] | None = None  # one per new token, when asked
    # prompt logprobs computed this step: (prompt index of the first scored token, per token its entry)
    new_prompt_logprobs: tuple[int, list[TokenLogprobs]] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended it (stop strings are the client's)
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache
    error: tuple[str | None, str] | None = None  # (param or None, message): this request failed alone
    first_scheduled_time: float | None = None  # on a request's first output: when it first ran

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """The core's gauges and counters, sent with outputs (and as a heartbeat when idle)."""

    num_running: int = 0  # requests with a sample running
    num_waiting: int = 0  # requests waiting for their first schedule (or after preemption)
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_preemptions_total: int = 0
    prefix_cache_queries_total: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # tokens found there
    prompt_tokens_total: int = 0  # every prompt token of every request, cache hits included (vLLM's)
    generation_tokens_total: int = 0
    num_steps: int = 0  # steps run so far: a client that sees it stall while has_work detects a hang
    has_work: bool = False
    max_lora: int = 0  # with enable_lora: max_loras (adapters per step)
    running_lora_adapters: dict[str, int] = {}  # adapter name -> running requests
    waiting_lora_adapters: dict[str, int] = {}  # adapter name -> waiting requests


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, kw_only=True):
    """One step's outputs for every request of one client, in one message."""

    outputs: list[EngineCoreOutput] = []
    timestamp: float = 0.0
    stats: SchedulerStats | None = None
    engine_index: int = 0


class CoreInfo(msgspec.Struct, array_like=True, kw_only=True):
    """What a front end needs to know about the core it talks to (sent once, when it is ready)."""

    model_name: str  # the served model name
    architecture: str
    max_model_len: int
    vocab_size: int  # the model's (a tokenizer may have fewer)
    num_total_blocks: int  # KV pages
    block_size: int  # tokens per page
    max_num_seqs: int
    default_max_tokens: int | None  # from the generation config; None: what the context leaves
    device: str
    world_size: int
    eos_token_ids: list[int] = []  # from the model's config and generation config (the tokenizer's is the front end's)
    startup_phases: dict[str, float] = {}  # start-up phases timed in the core's process
    lora_dims: list[int] = []  # with enable_lora: engine.lora.adapter.ModelDims, to check adapters in the front end
    device_description: str = ""  # `cpu (2 threads, 2 cores)`: the API process logs it (it has no torch on CPU)

    @property
    def kv_capacity(self) -> int:
        """Tokens the whole KV pool holds."""
        return self.num_total_blocks * self.block_size


encoder = msgspec.msgpack.Encoder()


def decoder_for(kind: type) -> msgspec.msgpack.Decoder:
    """A msgpack decoder that rebuilds `kind` (EngineCoreRequest, EngineCoreOutputs...)."""
    return msgspec.msgpack.Decoder(kind)
