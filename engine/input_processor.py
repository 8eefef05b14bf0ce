"""InputProcessor: the front end's checks of a tokenized request against the model and the KV pool,
and the EngineCoreRequest it becomes (max_tokens resolved, bad_words tokenized). Refusals are
RequestErrors naming the field; nothing reaches the core unless every check passed."""
from __future__ import annotations

from typing import Any

from engine.core_messages import CoreInfo, EngineCoreRequest
from engine.errors import RequestError
from engine.lora.request import LoRARequest
from engine.sampling_params import MAX_LOGPROBS, SamplingParams, SamplingParamsError


class InputProcessor:
    def __init__(self, info: CoreInfo, tokenizer: Any = None, *, serving_defaults: bool = True,
                 max_logprobs: int = MAX_LOGPROBS):
        self.info = info
        self.max_logprobs = max_logprobs  # EngineConfig's (vLLM's): the most logprobs and prompt_logprobs
        self.tokenizer = tokenizer  # the front end's; bad_words need it (None: a request with them is refused)
        # max_tokens None: True (API server) the generation config's max_new_tokens, as vLLM's serving layer
        # fills it; False (offline LLMEngine) the context left, as vLLM's input processor (offline, the
        # generation config's default comes in through LLM.get_default_sampling_params instead).
        # max_tokens past the context: True refused, as vLLM's server; False cut to the context, as vLLM's
        # offline engine (its input processor checks the prompt alone; the sample ends with "length")
        self.serving_defaults = serving_defaults

    def process(self, request_id: str, token_ids: list[int], params: SamplingParams, arrival_time: float,
                client_index: int = 0, lora_request: LoRARequest | None = None) -> EngineCoreRequest:
        params = self.tokenize_bad_words(params)
        self.validate(token_ids, params)
        info = self.info
        default = (info.default_max_tokens if self.serving_defaults else None) or info.max_model_len
        max_tokens = min(params.max_tokens or default, info.max_model_len - len(token_ids))
        return EngineCoreRequest(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                                 max_tokens=max_tokens, arrival_time=arrival_time, client_index=client_index,
                                 lora_request=lora_request)

    def tokenize_bad_words(self, params: SamplingParams) -> SamplingParams:
        """params with its bad_words as token ids (a copy: the caller's may serve other prompts)."""
        if not params.bad_words or params.bad_words_token_ids is not None:
            return params
        if self.tokenizer is None:
            raise RequestError("bad_words", "need the model's tokenizer, and this engine has none")
        params = params.clone()
        try:
            params.update_from_tokenizer(self.tokenizer)
        except SamplingParamsError as e:
            raise RequestError(e.param, str(e).split(": ", 1)[-1]) from None
        return params

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
        if (self.serving_defaults and params.max_tokens is not None
                and len(token_ids) + params.max_tokens > info.max_model_len):
            raise RequestError(
                "max_tokens", f"this model's maximum context length is {info.max_model_len} tokens, but "
                f"{len(token_ids)} prompt tokens + max_tokens {params.max_tokens} exceed it"
            )
        for name, what in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):  # vLLM's message
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise RequestError(name, f"Requested {what} logprobs of {value}, which is greater than max "
                                         f"allowed: {self.max_logprobs}")
        if self.serving_defaults and params.n > info.max_num_seqs:  # offline: they run max_num_seqs at a time
            raise RequestError("n", f"must be at most max_num_seqs ({info.max_num_seqs}), got {params.n}")
        if any(t >= vocab for t in params.stop_token_ids):
            raise RequestError("stop_token_ids", f"token ids must be in [0, {vocab})")
        bad_word_ids = [t for word in params.bad_words_token_ids or () for t in word]
        for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("bad_words", bad_word_ids)):
            outside = sorted(t for t in ids if t >= vocab)
            if outside:
                raise RequestError(name, f"token id {outside[0]} is outside the vocabulary [0, {vocab})")
        max_tokens = params.max_tokens  # offline, cut to the context (serving_defaults)
        if max_tokens is not None and not self.serving_defaults:
            max_tokens = min(max_tokens, info.max_model_len - len(token_ids))
        capacity = info.kv_capacity
        if len(token_ids) + 1 > capacity:
            raise RequestError("prompt", f"the prompt does not fit in the whole KV cache ({capacity} tokens)")
        if len(token_ids) + (max_tokens or 0) > capacity:
            raise RequestError("max_tokens", f"{len(token_ids)} prompt tokens + max_tokens {max_tokens} do "
                                             f"not fit in the whole KV cache ({capacity} tokens)")
