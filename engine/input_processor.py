"""InputProcessor: the front end's checks of a tokenized request against the model and the KV pool,
and the EngineCoreRequest it becomes (max_tokens resolved). Refusals are RequestErrors naming the
field; nothing reaches the core unless every check passed."""
from __future__ import annotations

from engine.core_messages import CoreInfo, EngineCoreRequest
from engine.errors import RequestError
from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, info: CoreInfo):
        self.info = info

    def process(self, request_id: str, token_ids: list[int], params: SamplingParams, arrival_time: float,
                client_index: int = 0, lora_request: LoRARequest | None = None) -> EngineCoreRequest:
        self.validate(token_ids, params)
        info = self.info
        # no max_tokens: the model's generation_config default (as vLLM), else the context left
        default = info.default_max_tokens or info.max_model_len
        max_tokens = min(params.max_tokens or default, info.max_model_len - len(token_ids))
        return EngineCoreRequest(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                                 max_tokens=max_tokens, arrival_time=arrival_time, client_index=client_index,
                                 lora_request=lora_request)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        info = self.info
        if not token_ids:
            raise RequestError("prompt", "the prompt is empty")
        vocab = info.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise RequestError("prompt", f"token ids must be integers in [0, {vocab})")
        if len(token_ids) >= info.max_model_len:
            raise RequestError(
                "prompt", f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                f"{info.max_model_len}, which leaves no room to generate"
            )
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > info.max_model_len:
            raise RequestError(
                "max_tokens", f"this model's maximum context length is {info.max_model_len} tokens, but "
                f"{len(token_ids)} prompt tokens + max_tokens {params.max_tokens} exceed it"
            )
        if params.n > info.max_num_seqs:
            raise RequestError("n", f"must be at most max_num_seqs ({info.max_num_seqs}), got {params.n}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise RequestError("stop_token_ids", f"token ids must be in [0, {vocab})")
        capacity = info.kv_capacity
        if len(token_ids) + 1 > capacity:
            raise RequestError("prompt", f"the prompt does not fit in the whole KV cache ({capacity} tokens)")
        if len(token_ids) + (params.max_tokens or 0) > capacity:
            raise RequestError("max_tokens", f"{len(token_ids)} prompt tokens + max_tokens {params.max_tokens} do "
                                             f"not fit in the whole KV cache ({capacity} tokens)")
