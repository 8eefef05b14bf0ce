"""OpenAI chat request validation (engine/server/protocol.py's rules and helpers): chat messages, as text
parts or strings, ready for the chat template; /v1/chat/completions bodies -> ChatRequest; /tokenize bodies
(a prompt or chat messages) -> TokenizeRequest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.server.protocol import (
    CHAT_ROLES,
    VLLM_UNSUPPORTED,
    ModelContext,
    _bool,
    _int,
    _str,
    _stream_options,
    _unsupported,
    bad,
    beam_search_params,
    check_model,
    check_text,
    prompt_truncation,
    sampling_params,
    show,
)

if TYPE_CHECKING:
    from engine.beam_search import BeamSearchParams


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]  # role and plain-text content, ready for the chat template
    add_generation_prompt: bool
    params: SamplingParams
    stream: bool
    include_usage: bool
    continuous_usage: bool  # stream_options.continuous_usage_stats: usage in every chunk
    logprobs: bool
    top_logprobs: int
    beam: BeamSearchParams | None = None  # use_beam_search: this search runs instead of sampling
    continue_final_message: bool = False  # the last (assistant) message is left open for the model to go on
    max_tokens_param: str = "max_tokens"  # the field that gave params.max_tokens (max_completion_tokens wins)
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: more template variables (the renderer checks them)
    tokens_as_ids: bool = False  # vLLM's return_tokens_as_token_ids: logprobs name tokens "token_id:{id}"
    truncate: int | None = None  # truncate_prompt_tokens: the templated prompt keeps its last `truncate` tokens
    add_special_tokens: bool = False  # vLLM's: the tokenizer's special tokens around the templated text too


def _message_content(content: Any, name: str, ctx: ModelContext, role: str) -> str:
    """A message's text; a list of parts is joined with newlines, as vLLM joins them (an assistant's
    `refusal` part counts as text, as vLLM's does)."""
    if isinstance(content, str):
        return check_text(content, name, ctx)
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            key = "refusal" if kind == "refusal" and role == "assistant" else "text"
            if kind != key or not isinstance(part.get(key), str):
                raise bad(f"{name}[{j}]", f"only parts of type `text` with a string `text` are supported, got "
                                          f"{show(kind) if isinstance(part, dict) else show(part)}")
            parts.append(check_text(part[key], f"{name}[{j}].{key}", ctx))
        return check_text("\n".join(parts), name, ctx)
    raise bad(name, "must be a string or a list of text parts")


def parse_messages(messages: Any, ctx: ModelContext) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise bad("messages", "is required and must be a list of messages")
    if not messages:
        raise bad("messages", "must contain at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "must be an object with `role` and `content`")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {show(role)}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        message = {"role": role, "content": _message_content(content, f"messages[{i}].content", ctx, role)}
        speaker = m.get("name")  # a participant's name: the chat template may show it (as vLLM passes it on)
        if speaker is not None:
            if not isinstance(speaker, str):
                raise bad(f"messages[{i}].name", f"must be a string, got {show(speaker)}")
            message["name"] = check_text(speaker, f"messages[{i}].name", ctx)
        out.append(message)
    total = sum(len(m["content"]) for m in out)
    if ctx.max_text_chars is not None and total > ctx.max_text_chars:
        raise bad("messages", f"{total} characters of content cannot fit in max_model_len ({ctx.max_model_len} "
                              f"tokens of at most {ctx.max_text_chars // ctx.max_model_len} characters each)")
    return out


def _open_message(body: dict, messages: list[dict[str, str]]) -> tuple[bool, bool]:
    """(add_generation_prompt, continue_final_message): which message the template leaves open."""
    add_generation_prompt = _bool(body, "add_generation_prompt") is not False
    continue_final = bool(_bool(body, "continue_final_message"))
    if continue_final and add_generation_prompt:  # vLLM's rule: the two open different messages
        raise bad("continue_final_message", "cannot be true with add_generation_prompt (set it to false)")
    if continue_final and messages[-1]["role"] != "assistant":
        raise bad("continue_final_message", "the last message must be the assistant's to continue")
    return add_generation_prompt, continue_final


def parse_chat_request(body: dict, ctx: ModelContext) -> ChatRequest:
    check_model(body, ctx)
    messages = parse_messages(body.get("messages"), ctx)
    _unsupported(body, "functions", "audio", "prediction", "echo", "chat_template", "documents",
                 *VLLM_UNSUPPORTED)  # tools: engine/server/tools.py
    stream = bool(_bool(body, "stream"))
    logprobs = bool(_bool(body, "logprobs"))
    top_logprobs = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise bad("top_logprobs", "requires logprobs to be true")
    # both checked; max_completion_tokens wins (OpenAI's newer name, as vLLM)
    max_completion_tokens, max_tokens = _int(body, "max_completion_tokens", 1), _int(body, "max_tokens", 1)
    max_tokens_param = "max_tokens" if max_completion_tokens is None else "max_completion_tokens"
    max_tokens = max_tokens if max_completion_tokens is None else max_completion_tokens
    add_generation_prompt, continue_final = _open_message(body, messages)
    params = sampling_params(body, ctx, max_tokens, (top_logprobs or 0) if logprobs else None, max_tokens_param)
    include_usage, continuous_usage = _stream_options(body, stream)
    return ChatRequest(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final,
        params=params,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        max_tokens_param=max_tokens_param,
        chat_template_kwargs=body.get("chat_template_kwargs"),
        tokens_as_ids=bool(_bool(body, "return_tokens_as_token_ids")),
        truncate=prompt_truncation(body, ctx),
        logprobs=logprobs,
        top_logprobs=top_logprobs or 0,
        beam=beam_search_params(body, ctx, params, stream, "logprobs" if logprobs else None),
        add_special_tokens=bool(_bool(body, "add_special_tokens")),
    )


@dataclass
class TokenizeRequest:
    prompt: str | None  # either a prompt ...
    messages: list[dict[str, str]] | None  # ... or chat messages through the template
    add_special_tokens: bool
    add_generation_prompt: bool
    continue_final_message: bool = False  # as chat's: the prompt a chat request with these fields would get
    return_token_strs: bool = False  # vLLM's: the tokens' vocabulary strings too (token_strs)
    chat_template_kwargs: dict[str, Any] | None = None  # as chat's


def parse_tokenize_request(body: dict, ctx: ModelContext) -> TokenizeRequest:
    check_model(body, ctx)
    prompt = _str(body, "prompt")
    if prompt is None and body.get("messages") is None:
        raise bad("prompt", "either `prompt` or `messages` is required")
    if prompt is not None and body.get("messages") is not None:  # one would be dropped without a word
        raise bad("messages", "give `prompt` or `messages`, not both")
    if prompt is not None:
        check_text(prompt, "prompt", ctx)
    messages = parse_messages(body["messages"], ctx) if prompt is None else None
    add_special = _bool(body, "add_special_tokens")  # vLLM's defaults: true for a prompt, false for messages
    add_gen, continue_final = _open_message(body, messages) if messages is not None else (True, False)
    return TokenizeRequest(prompt, messages, messages is None if add_special is None else add_special, add_gen,
                           continue_final, bool(_bool(body, "return_token_strs")), body.get("chat_template_kwargs"))
