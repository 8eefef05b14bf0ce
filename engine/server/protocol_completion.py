"""/v1/completions bodies -> CompletionRequest, and /detokenize bodies -> token ids (engine/server/protocol.py's
rules and field readers: every rejection an APIError naming the field)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams
from engine.server.protocol import (
    MAX_COMPLETION_LOGPROBS,
    MAX_PROMPTS,
    ModelContext,
    VLLM_UNSUPPORTED,
    _bool,
    _int,
    _stream_options,
    _token_ids,
    _unsupported,
    bad,
    beam_search_params,
    check_model,
    check_text,
    prompt_truncation,
    sampling_params,
)

if TYPE_CHECKING:
    from engine.beam_search import BeamSearchParams


Prompt = str | list[int]


@dataclass
class CompletionRequest:
    prompts: list[Prompt]  # one engine request each
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool  # stream_options.continuous_usage_stats: usage in every chunk
    echo: bool
    logprobs: int | None  # top-k per token in the legacy format
    echo_only: bool = False  # max_tokens 0 with echo: the prompt alone (params.max_tokens 1, its token hidden)
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:{id}"
    truncate: int | None = None  # truncate_prompt_tokens: each prompt keeps its last `truncate` tokens
    beam: BeamSearchParams | None = None  # use_beam_search: this search runs instead of sampling
    add_special_tokens: bool = True  # vLLM's: the tokenizer's special tokens (a BOS) around a text prompt


def parse_completion_request(body: dict, ctx: ModelContext) -> CompletionRequest:
    check_model(body, ctx)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "is required")
    # a token-id prompt must leave room for one generated token (once truncated, if it is)
    truncate = prompt_truncation(body, ctx)
    max_ids = None if truncate else ctx.max_model_len - 1
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [_token_ids(prompt, "prompt", ctx.vocab_size, max_ids)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompt)}")
        prompts = [_token_ids(p, f"prompt[{i}]", ctx.vocab_size, max_ids) for i, p in enumerate(prompt)]
    else:
        raise bad("prompt", "must be a non-empty string, list of strings, list of token ids or list of lists of token ids")
    if len(prompts) > MAX_PROMPTS:
        raise bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    for i, p in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
        if len(p) == 0:
            raise bad(name, "must not be empty")
        if isinstance(p, str):
            check_text(p, name, ctx)
    _unsupported(body, "suffix", *VLLM_UNSUPPORTED)
    stream = bool(_bool(body, "stream"))
    logprobs = _int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    echo = bool(_bool(body, "echo"))
    max_tokens = _int(body, "max_tokens", 0 if echo else 1)
    if max_tokens == 0 and _bool(body, "use_beam_search"):
        raise bad("max_tokens", "0 (echo the prompt alone) is not supported with use_beam_search")
    min_tokens = _int(body, "min_tokens", 0)
    if max_tokens == 0 and min_tokens:  # checked here: the engine runs max_tokens 0 as 1, hidden
        raise bad("min_tokens", f"must be <= max_tokens (0), got {min_tokens}")
    params = sampling_params(body, ctx, 1 if max_tokens == 0 else max_tokens, logprobs)
    include_usage, continuous_usage = _stream_options(body, stream)
    return CompletionRequest(
        prompts=prompts,
        params=params,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        echo=echo,
        logprobs=logprobs,
        echo_only=max_tokens == 0,
        tokens_as_ids=bool(_bool(body, "return_tokens_as_token_ids")),
        truncate=truncate,
        beam=beam_search_params(body, ctx, params, stream, None if logprobs is None else "logprobs"),
        add_special_tokens=_bool(body, "add_special_tokens") is not False,
    )


def parse_detokenize_request(body: dict, ctx: ModelContext) -> list[int]:
    check_model(body, ctx)
    if "tokens" not in body:
        raise bad("tokens", "is required")
    return _token_ids(body["tokens"], "tokens", ctx.vocab_size, ctx.max_model_len)
