"""OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize.

Handlers have text.py validate and tokenize the body, submit token ids to the AsyncEngine
(engine/server/serving.py) and turn its deltas into OpenAI's response objects or SSE chunks.
Leaving a handler early aborts its requests.
"""
from __future__ import annotations

import dataclasses
import time
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from engine.server.async_llm import RequestStream
from engine.server.logprobs import (
    TokenText,
    chat_logprobs,
    completion_logprobs,
    merge_completion_logprobs,
    prompt_logprobs_json,
)
from engine.server.lora_routes import adapter_cards, register_lora_routes, requested_lora
from engine.server.protocol import APIError
from engine.server.reasoning import ReasoningDeltas, assistant_message, get_reasoning_spec
from engine.server.results import Results, Sample
from engine.server.serving import (
    beam_search,
    beam_usage,
    best_of_sampling,
    collect,
    iterate_sse,
    json_field,
    keep_best_of,
    sse,
    sse_head,
    stream_started,
    submit,
    usage_so_far,
)
from engine.server.text import PreparedChat, PreparedCompletion
from engine.server.tool_stream import ToolDeltas
from engine.server.tools import tool_message

if TYPE_CHECKING:
    from engine.server.app import ServerState


def _state(request: Request) -> ServerState:
    return request.app.ctx.state


# ---- routes ----

def _model_card(state: ServerState) -> dict[str, Any]:
    """OpenAI's Model object, plus vLLM's extras (root, parent, max_model_len, permission)."""
    engine = state.model_info
    return {
        "id": engine.model_name,
        "object": "model",
        "created": state.created,
        "owned_by": "gantry",
        "root": state.engine_config.model or engine.model_name,
        "parent": None,
        "max_model_len": engine.max_model_len,
        "permission": [],
    }


async def list_models(request: Request) -> HTTPResponse:
    state = _state(request).require_ready()
    return json_response({"object": "list", "data": [_model_card(state), *adapter_cards(state, state.created)]})


async def retrieve_model(request: Request, model_id: str) -> HTTPResponse:
    state = _state(request).require_ready()
    model_id = urllib.parse.unquote(model_id)  # Sanic hands the path over percent-encoded (a name "ü" is %C3%BC)
    name = state.model_info.model_name
    adapter = next((c for c in adapter_cards(state, state.created) if c["id"] == model_id), None)
    if adapter is not None:
        return json_response(adapter)
    if model_id != name:
        raise APIError(404, f"model: the model `{model_id[:200]}` does not exist; this server serves `{name}`",
                       param="model", code="model_not_found")
    return json_response(_model_card(state))


def _hide_samples(samples: list[Sample]) -> None:
    """max_tokens 0 with echo: the one token each sample drew is not the client's; a choice is its prompt
    alone, finished by length, and counts no completion tokens (as OpenAI's)."""
    for s in samples:
        s.text, s.token_ids, s.logprobs = "", [], []
        if s.finish_reason is not None:
            s.finish_reason, s.stop_reason = "length", None


async def create_completion(request: Request) -> HTTPResponse | None:
    state = _state(request).require_ready()
    assert state.frontend is not None
    prepared: PreparedCompletion = await state.frontend.run("completion", request.body)
    req = prepared.request  # its prompts are token ids now
    lora = requested_lora(state, request.body, beam=req.beam is not None)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = state.model_info.model_name if lora is None else lora.lora_name
    detok = TokenText(state.frontend.tokenizer, req.tokens_as_ids)
    params = req.params
    # the echoed prompt's tokens get their logprobs too (the request's own prompt_logprobs wins, as in vLLM)
    if req.echo and req.logprobs is not None and params.prompt_logprobs is None:
        params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
    top = req.logprobs or 0
    if req.beam is not None:  # non-streaming only (the parser refuses stream)
        beams = await beam_search(state, req.prompts, req.beam, params.n, cid, "prompt")
        choices = [{"index": p * params.n + j, "text": (prepared.prompt_texts[p] or "" if req.echo else "") + b.text,
                    "logprobs": None, "finish_reason": b.finish_reason, "stop_reason": b.stop_reason}
                   for p, per_prompt in enumerate(beams) for j, b in enumerate(per_prompt)]
        return json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                              "choices": choices, "usage": beam_usage(req.prompts, beams)})
    n = params.n
    if params.best_of is not None and params.best_of > n:  # the n best of best_of samples (not streamed)
        params = best_of_sampling(state, params)
    subs = [(f"{cid}-{i}", p, params) for i, p in enumerate(req.prompts)]

    def prefix(results: Results, choice: int) -> tuple[str, dict | None]:
        """The echoed prompt of a choice, and its logprobs (null for the first token)."""
        r = results.requests[choice // results.n]
        if not req.echo:
            return "", None
        lps = (completion_logprobs(r.prompt_token_ids, r.prompt_logprobs, top, detok, 0)
               if req.logprobs is not None else None)
        return r.prompt, lps

    if not req.stream:
        async def respond(stream: RequestStream, results: Results) -> HTTPResponse:
            await collect(stream, results, "prompt")
            if results.n != n:
                keep_best_of(results, n)
            if req.echo_only:
                _hide_samples([s for r in results.requests for s in r.samples])
            choices = []
            for p, r in enumerate(results.requests):
                for i, s in enumerate(r.samples):
                    choice = p * results.n + i
                    text, lps = prefix(results, choice)
                    if req.logprobs is not None:
                        lps = merge_completion_logprobs(lps, completion_logprobs(s.token_ids, s.logprobs, top, detok, len(text)))
                    choices.append({"index": choice, "text": text + s.text, "logprobs": lps,
                                    "finish_reason": s.finish_reason, "stop_reason": s.stop_reason})
                    if req.params.prompt_logprobs is not None:  # vLLM's extra field, when asked
                        choices[-1]["prompt_logprobs"] = prompt_logprobs_json(r.prompt_logprobs, detok)
            return json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                                  "choices": choices, "usage": results.usage()})

        return await submit(request, state, subs, "prompt", respond, prepared.prompt_texts, lora)

    async def respond_stream(stream: RequestStream, results: Results) -> None:
        await stream_started(stream, "prompt")
        response = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        offsets: dict[int, int] = {}

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                                    "choices": choices}
            if usage is not None:  # the schema's usage is not nullable here (unlike chat chunks): omit it
                body["usage"] = usage
            return sse(body)

        head = sse_head("text_completion", cid, created, model)
        async for batch in iterate_sse(response, stream, "prompt"):
            parts = []
            changes = results.apply_all(batch)
            if req.echo_only:
                changes = [(choice, s, "", 0) for choice, s, _, _ in changes]
                _hide_samples([s for _, s, _, _ in changes])
            for choice, s, new_text, num_new in changes:
                text, lps = ("", None)
                if choice not in offsets:
                    text, lps = prefix(results, choice)
                    offsets[choice] = len(text)
                if req.logprobs is not None and num_new:
                    lps = merge_completion_logprobs(lps, completion_logprobs(
                        s.token_ids[-num_new:], s.logprobs[-num_new:], top, detok, offsets[choice]))
                offsets[choice] += len(new_text)
                if not (text or new_text or lps is not None or s.finish_reason is not None):
                    continue  # tokens that end inside a character: nothing to say yet
                # the common chunk written directly: json.dumps of the whole body per token was
                # the API process's largest cost at a few thousand tokens a second
                usage = (f',"usage":{json_field(usage_so_far(results.requests[choice // results.n].prompt_token_ids, s))}'
                         if req.continuous_usage else "")
                parts.append(f'{head}{{"index":{choice},"text":{json_field(text + new_text)},"logprobs":'
                             f'{json_field(lps)},"finish_reason":{json_field(s.finish_reason)},"stop_reason":'
                             f'{json_field(s.stop_reason)}}}]{usage}}}\n\n')
            if parts:
                await response.send("".join(parts))
        if req.include_usage:
            await response.send(chunk([], results.usage()))
        await response.send(sse("[DONE]"))
        await response.eof()

    return await submit(request, state, subs, "prompt", respond_stream, prepared.prompt_texts, lora)


async def create_chat_completion(request: Request) -> HTTPResponse | None:
    """A refusal that names max_tokens names the field the client wrote (max_completion_tokens: OpenAI's
    newer name, which the engine knows as max_tokens)."""
    try:
        return await _chat_completion(request)
    except APIError as e:
        field = getattr(request.ctx, "max_tokens_param", "max_tokens")
        if e.param != "max_tokens" or field == "max_tokens":
            raise
        raise APIError(e.status, e.message.replace("max_tokens", field), field, e.type, e.code, e.headers) from None


async def _chat_completion(request: Request) -> HTTPResponse | None:
    state = _state(request).require_ready()
    assert state.frontend is not None
    prepared: PreparedChat = await state.frontend.run("chat", request.body)
    request.ctx.max_tokens_param = prepared.request.max_tokens_param
    lora = requested_lora(state, request.body, beam=prepared.request.beam is not None)
    req = prepared.request
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = state.model_info.model_name if lora is None else lora.lora_name
    detok = TokenText(state.frontend.tokenizer, req.tokens_as_ids)
    params, n = req.params, req.params.n
    reasoning = get_reasoning_spec(state.server_config.reasoning_parser)
    if req.beam is not None:  # non-streaming only (the parser refuses stream)
        beams = await beam_search(state, [prepared.prompt_token_ids], req.beam, n, cid, "messages")
        choices = [{"index": j, "message": {"role": "assistant", "content": b.text, "refusal": None}, "logprobs": None,
                    "finish_reason": b.finish_reason, "stop_reason": b.stop_reason} for j, b in enumerate(beams[0])]
        return json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                              "choices": choices, "usage": beam_usage([prepared.prompt_token_ids], beams)})
    if params.best_of is not None and params.best_of > n:  # the n best of best_of samples (not streamed)
        params = best_of_sampling(state, params)
    subs = [(f"{cid}-0", prepared.prompt_token_ids, params)]

    if not req.stream:
        async def respond(stream: RequestStream, results: Results) -> HTTPResponse:
            await collect(stream, results, "messages")
            if results.n != n:
                keep_best_of(results, n)
            choices = []
            for i, s in enumerate(results.requests[0].samples):
                lps = chat_logprobs(s.token_ids, s.logprobs, req.top_logprobs, detok) if req.logprobs else None
                message = assistant_message(reasoning, s.text)
                finish = s.finish_reason if prepared.tools is None else tool_message(prepared.tools, message,
                                                                                      s.finish_reason)
                choices.append({"index": i, "message": message, "logprobs": lps, "finish_reason": finish,
                                "stop_reason": s.stop_reason})
            body = {"id": cid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                    "usage": results.usage()}
            if params.prompt_logprobs is not None:  # vLLM's extra field, when asked
                body["prompt_logprobs"] = prompt_logprobs_json(results.requests[0].prompt_logprobs, detok)
            return json_response(body)

        return await submit(request, state, subs, "messages", respond, lora_request=lora)

    async def respond_stream(stream: RequestStream, results: Results) -> None:
        await stream_started(stream, "messages")
        response = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": choices}
            if req.include_usage:
                body["usage"] = usage
            return sse(body)

        role_usage = usage_so_far(prepared.prompt_token_ids, None) if req.continuous_usage else None
        for i in range(req.params.n):
            await response.send(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], role_usage))
        head = sse_head("chat.completion.chunk", cid, created, model)
        tail = ',"usage":null}\n\n' if req.include_usage else '}\n\n'
        split = None if reasoning is None else ReasoningDeltas(reasoning)
        tool_deltas = None if prepared.tools is None else ToolDeltas(prepared.tools)
        async for batch in iterate_sse(response, stream, "messages"):
            parts = []
            for choice, s, new_text, num_new in results.apply_all(batch):
                lps = None
                if req.logprobs and num_new:
                    lps = chat_logprobs(s.token_ids[-num_new:], s.logprobs[-num_new:], req.top_logprobs, detok)
                if not new_text and lps is None and s.finish_reason is None:
                    continue
                message = f'{{"content":{json_field(new_text)}}}' if new_text else "{}"
                finish, done = s.finish_reason, s.finish_reason is not None
                if split is not None or tool_deltas is not None:
                    d = split.delta(choice, new_text, done) if split else {"content": new_text} if new_text else {}
                    if tool_deltas is not None:
                        d, finish = tool_deltas.delta(choice, d, done), tool_deltas.finish_reason(choice, finish)
                    message = json_field(d)
                if req.continuous_usage:
                    tail = f',"usage":{json_field(usage_so_far(prepared.prompt_token_ids, s))}}}\n\n'
                parts.append(f'{head}{{"index":{choice},"delta":{message},"logprobs":{json_field(lps)},'
                             f'"finish_reason":{json_field(finish)},"stop_reason":{json_field(s.stop_reason)}}}]'
                             f'{tail}')
            if parts:
                await response.send("".join(parts))
        if req.include_usage:
            await response.send(chunk([], results.usage()))
        await response.send(sse("[DONE]"))
        await response.eof()

    return await submit(request, state, subs, "messages", respond_stream, lora_request=lora)


async def tokenize(request: Request) -> HTTPResponse:
    state = _state(request).require_ready()
    assert state.frontend is not None
    tokens, token_strs = await state.frontend.run("tokenize", request.body)
    requested_lora(state, request.body)  # with LoRA on, `model` is checked here: an unknown name is a 404
    return json_response({"count": len(tokens), "max_model_len": state.model_context.max_model_len, "tokens": tokens,
                          "token_strs": token_strs})


async def detokenize(request: Request) -> HTTPResponse:
    state = _state(request).require_ready()
    assert state.frontend is not None
    requested_lora(state, request.body)
    return json_response({"prompt": await state.frontend.run("detokenize", request.body)})


def register_openai_routes(app: Sanic) -> None:
    app.add_route(list_models, "/v1/models", methods=["GET"])
    app.add_route(retrieve_model, "/v1/models/<model_id:path>", methods=["GET"])
    app.add_route(create_completion, "/v1/completions", methods=["POST"])
    app.add_route(create_chat_completion, "/v1/chat/completions", methods=["POST"])
    app.add_route(tokenize, "/tokenize", methods=["POST"])
    app.add_route(detokenize, "/detokenize", methods=["POST"])
    register_lora_routes(app)

