"""OpenAI routes: /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize.

Handlers have text.py validate and tokenize the body, submit token ids to the AsyncEngine,
and turn its deltas into OpenAI's response objects or SSE chunks. Leaving a handler early
aborts its requests.
"""
from __future__ import annotations

import dataclasses
import json
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from sanic import Request, Sanic
from sanic.response import HTTPResponse
from sanic.response import json as json_response

from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams
from engine.server.async_llm import PromptInput, RequestDelta, RequestStream
from engine.server.lora_routes import adapter_cards, register_lora_routes, requested_lora
from engine.server.logprobs import TokenText, chat_logprobs, completion_logprobs, merge_completion_logprobs
from engine.beam_search import BeamSearchParams, best_of_params
from engine.server.beam import BeamResult, best_of_order, run_beam_search_all, step_generate
from engine.server.protocol import APIError
from engine.server.results import Results, Sample
from engine.server.reasoning import ReasoningDeltas, assistant_message, get_reasoning_spec
from engine.server.text import PreparedChat, PreparedCompletion
from engine.server.tool_stream import ToolDeltas
from engine.server.tools import tool_message

if TYPE_CHECKING:
    from engine.server.app import ServerState

def _state(request: Request) -> ServerState:
    return request.app.ctx.state


# ---- shared plumbing ----

# JSON may carry U+0085, U+2028 and U+2029 raw, but line readers that follow str.splitlines (httpx's
# iter_lines) end an SSE line there: a token that decodes to one cut its chunk in two. Escaped, they are
# the same JSON string.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _one_line(text: str) -> str:
    return text if text.isascii() else text.translate(_LINE_BREAKS)  # isascii: the common case, no table walk


def _sse(data: dict[str, Any] | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(',', ':'))
    return f"data: {_one_line(body)}\n\n"


def _engine_error(e: Exception, prompt_param: str) -> APIError:
    param = getattr(e, "param", None)
    if isinstance(e, ValueError) and param is not None:
        if param == "prompt":
            param = prompt_param
        message = str(e).split(": ", 1)[-1]
        return APIError(400, f"{param}: {message}", param=param)
    if isinstance(e, ConnectionAbortedError):
        return APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
    return APIError(500, "internal server error: the engine failed", code="internal_error")


async def _generate(request: Request, state: ServerState, requests: list[tuple[str, PromptInput, SamplingParams]],
                    prompt_param: str, respond: Callable[[RequestStream, Results], Any],
                    prompt_texts: list[str | None] | None = None, lora_request: LoRARequest | None = None) -> Any:
    """Submit, then hand the stream to `respond`; engine refusals become 400s naming the field."""
    params = requests[0][2]
    state.check_capacity(len(requests), len(requests) * max(params.n, params.best_of or 1),
                         "best_of" if params.best_of else "n")
    arrival = time.time()
    results = Results([rid for rid, _, _ in requests], params.n)
    for r, text in zip(results.requests, prompt_texts or []):
        r.prompt = text or ""
    try:
        async with state.engine.generate(requests, arrival, lora_request) as stream:
            return await respond(stream, results)
    except APIError:
        raise
    except (ValueError, ConnectionAbortedError) as e:
        raise _engine_error(e, prompt_param) from None


async def _iterate(stream: RequestStream, prompt_param: str) -> AsyncIterator[RequestDelta]:
    try:
        async for delta in stream:
            yield delta
    except APIError:
        raise
    except Exception as e:  # the engine loop died or is shutting down
        raise _engine_error(e, prompt_param) from None


async def _iterate_sse(response: Any, stream: RequestStream, prompt_param: str) -> AsyncIterator[list[RequestDelta]]:
    """The deltas queued since the last write, once the SSE headers are out: a failure becomes an
    error event."""
    try:
        async for batch in stream.batches():
            yield batch
    except APIError as e:
        await response.send(_sse(e.body()))
    except Exception as e:  # the engine core died or the server is shutting down
        await response.send(_sse(_engine_error(e, prompt_param).body()))


_encode_json = msgspec.json.Encoder().encode


def _json(value: Any) -> str:
    """JSON text of a chunk's field (UTF-8 kept as is, like json.dumps(ensure_ascii=False), ~10x faster;
    line separators escaped, as _sse does)."""
    return _one_line(_encode_json(value).decode())


def _sse_head(obj: str, cid: str, created: int, model: str) -> str:
    """The start of every chunk of a stream, up to its choices (the one part that changes)."""
    return f'data: {{"id":{_json(cid)},"object":"{obj}","created":{created},"model":{_json(model)},"choices":['


async def _beam_search(state: ServerState, prompts: list[list[int]], beam: BeamSearchParams, n: int, cid: str,
                       prompt_param: str) -> list[list[BeamResult]]:
    """use_beam_search: each prompt's n best beams (engine/server/beam.py), each step's requests
    through the same AsyncLLM.generate as sampling; refusals become 400s naming the field."""
    num_beams = beam.beam_width * len(prompts)  # each step: one engine request a beam
    state.check_capacity(num_beams, num_beams, "beam_width")
    info = state.model_info
    if beam.max_tokens is None and info.default_max_tokens:
        beam = dataclasses.replace(beam, max_tokens=info.default_max_tokens)
    try:
        return await run_beam_search_all(
            step_generate(state.engine.generate), prompts, beam, n, eos_token_ids=sorted(state.engine.eos_token_ids),
            max_model_len=info.max_model_len, tokenizer=state.frontend.tokenizer, request_id=cid)
    except APIError:
        raise
    except Exception as e:  # a refusal, or (as in _iterate) the engine died or the server is shutting down
        raise _engine_error(e, prompt_param) from None


def _beam_usage(prompts: list[list[int]], beams: list[list[BeamResult]]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(b.token_ids) for per_prompt in beams for b in per_prompt)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _best_of_params(state: ServerState, params: SamplingParams) -> SamplingParams:
    try:
        return best_of_params(params, state.model_info.max_num_seqs)
    except ValueError as e:  # RequestError naming best_of
        raise _engine_error(e, "prompt") from None


def _keep_best_of(results: Results, n: int) -> None:
    """best_of > n: of each prompt's best_of samples keep the n with the highest cumulative logprob."""
    for r in results.requests:
        r.samples = [r.samples[i] for i in best_of_order([(s.token_ids, s.logprobs) for s in r.samples], n)]
    results.n = n


def _usage_so_far(prompt_token_ids: list[int], sample: Sample | None) -> dict[str, int]:
    """stream_options.continuous_usage_stats: a chunk's usage, its choice's tokens so far (as vLLM's)."""
    prompt, completion = len(prompt_token_ids), 0 if sample is None else len(sample.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _collect(stream: RequestStream, results: Results, prompt_param: str) -> None:
    async for delta in _iterate(stream, prompt_param):
        results.apply(delta)


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


async def create_completion(request: Request) -> HTTPResponse | None:
    state = _state(request).require_ready()
    assert state.frontend is not None
    prepared: PreparedCompletion = await state.frontend.run("completion", request.body)
    req = prepared.request  # its prompts are token ids now
    lora = requested_lora(state, request.body, beam=req.beam is not None)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    model = state.model_info.model_name if lora is None else lora.lora_name
    detok = TokenText(state.frontend.tokenizer)
    params = req.params
    if req.echo and req.logprobs is not None:  # the echoed prompt's tokens get their logprobs too
        params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
    top = req.logprobs or 0
    if req.beam is not None:  # non-streaming only (the parser refuses stream)
        beams = await _beam_search(state, req.prompts, req.beam, params.n, cid, "prompt")
        choices = [{"index": p * params.n + j, "text": (prepared.prompt_texts[p] or "" if req.echo else "") + b.text,
                    "logprobs": None, "finish_reason": b.finish_reason, "stop_reason": b.stop_reason}
                   for p, per_prompt in enumerate(beams) for j, b in enumerate(per_prompt)]
        return json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                              "choices": choices, "usage": _beam_usage(req.prompts, beams)})
    n = params.n
    if params.best_of is not None and params.best_of > n:  # the n best of best_of samples (not streamed)
        params = _best_of_params(state, params)
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
            await _collect(stream, results, "prompt")
            if results.n != n:
                _keep_best_of(results, n)
            choices = []
            for p, r in enumerate(results.requests):
                for i, s in enumerate(r.samples):
                    choice = p * results.n + i
                    text, lps = prefix(results, choice)
                    if req.logprobs is not None:
                        lps = merge_completion_logprobs(lps, completion_logprobs(s.token_ids, s.logprobs, top, detok, len(text)))
                    choices.append({"index": choice, "text": text + s.text, "logprobs": lps,
                                    "finish_reason": s.finish_reason, "stop_reason": s.stop_reason})
            return json_response({"id": cid, "object": "text_completion", "created": created, "model": model,
                                  "choices": choices, "usage": results.usage()})

        return await _generate(request, state, subs, "prompt", respond, prepared.prompt_texts, lora)

    async def respond_stream(stream: RequestStream, results: Results) -> None:
        response = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        offsets: dict[int, int] = {}

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                                    "choices": choices}
            if usage is not None:  # the schema's usage is not nullable here (unlike chat chunks): omit it
                body["usage"] = usage
            return _sse(body)

        head = _sse_head("text_completion", cid, created, model)
        async for batch in _iterate_sse(response, stream, "prompt"):
            parts = []
            for choice, s, new_text, num_new in results.apply_all(batch):
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
                usage = (f',"usage":{_json(_usage_so_far(results.requests[choice // results.n].prompt_token_ids, s))}'
                         if req.continuous_usage else "")
                parts.append(f'{head}{{"index":{choice},"text":{_json(text + new_text)},"logprobs":'
                             f'{_json(lps)},"finish_reason":{_json(s.finish_reason)},"stop_reason":'
                             f'{_json(s.stop_reason)}}}]{usage}}}\n\n')
            if parts:
                await response.send("".join(parts))
        if req.include_usage:
            await response.send(chunk([], results.usage()))
        await response.send(_sse("[DONE]"))
        await response.eof()

    return await _generate(request, state, subs, "prompt", respond_stream, prepared.prompt_texts, lora)


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
    detok = TokenText(state.frontend.tokenizer)
    params, n = req.params, req.params.n
    reasoning = get_reasoning_spec(state.server_config.reasoning_parser)
    if req.beam is not None:  # non-streaming only (the parser refuses stream)
        beams = await _beam_search(state, [prepared.prompt_token_ids], req.beam, n, cid, "messages")
        choices = [{"index": j, "message": {"role": "assistant", "content": b.text, "refusal": None}, "logprobs": None,
                    "finish_reason": b.finish_reason, "stop_reason": b.stop_reason} for j, b in enumerate(beams[0])]
        return json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                              "choices": choices, "usage": _beam_usage([prepared.prompt_token_ids], beams)})
    if params.best_of is not None and params.best_of > n:  # the n best of best_of samples (not streamed)
        params = _best_of_params(state, params)
    subs = [(f"{cid}-0", prepared.prompt_token_ids, params)]

    if not req.stream:
        async def respond(stream: RequestStream, results: Results) -> HTTPResponse:
            await _collect(stream, results, "messages")
            if results.n != n:
                _keep_best_of(results, n)
            choices = []
            for i, s in enumerate(results.requests[0].samples):
                lps = chat_logprobs(s.token_ids, s.logprobs, req.top_logprobs, detok) if req.logprobs else None
                message = assistant_message(reasoning, s.text)
                finish = s.finish_reason if prepared.tools is None else tool_message(prepared.tools, message,
                                                                                      s.finish_reason)
                choices.append({"index": i, "message": message, "logprobs": lps, "finish_reason": finish,
                                "stop_reason": s.stop_reason})
            return json_response({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                  "choices": choices, "usage": results.usage()})

        return await _generate(request, state, subs, "messages", respond, lora_request=lora)

    async def respond_stream(stream: RequestStream, results: Results) -> None:
        response = await request.respond(content_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": choices}
            if req.include_usage:
                body["usage"] = usage
            return _sse(body)

        role_usage = _usage_so_far(prepared.prompt_token_ids, None) if req.continuous_usage else None
        for i in range(req.params.n):
            await response.send(chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], role_usage))
        head = _sse_head("chat.completion.chunk", cid, created, model)
        tail = ',"usage":null}\n\n' if req.include_usage else '}\n\n'
        split = None if reasoning is None else ReasoningDeltas(reasoning)
        tool_deltas = None if prepared.tools is None else ToolDeltas(prepared.tools)
        async for batch in _iterate_sse(response, stream, "messages"):
            parts = []
            for choice, s, new_text, num_new in results.apply_all(batch):
                lps = None
                if req.logprobs and num_new:
                    lps = chat_logprobs(s.token_ids[-num_new:], s.logprobs[-num_new:], req.top_logprobs, detok)
                if not new_text and lps is None and s.finish_reason is None:
                    continue
                message = f'{{"content":{_json(new_text)}}}' if new_text else "{}"
                finish, done = s.finish_reason, s.finish_reason is not None
                if split is not None or tool_deltas is not None:
                    d = split.delta(choice, new_text, done) if split else {"content": new_text} if new_text else {}
                    if tool_deltas is not None:
                        d, finish = tool_deltas.delta(choice, d, done), tool_deltas.finish_reason(choice, finish)
                    message = _json(d)
                if req.continuous_usage:
                    tail = f',"usage":{_json(_usage_so_far(prepared.prompt_token_ids, s))}}}\n\n'
                parts.append(f'{head}{{"index":{choice},"delta":{message},"logprobs":{_json(lps)},'
                             f'"finish_reason":{_json(finish)},"stop_reason":{_json(s.stop_reason)}}}]'
                             f'{tail}')
            if parts:
                await response.send("".join(parts))
        if req.include_usage:
            await response.send(chunk([], results.usage()))
        await response.send(_sse("[DONE]"))
        await response.eof()

    return await _generate(request, state, subs, "messages", respond_stream, lora_request=lora)


async def tokenize(request: Request) -> HTTPResponse:
    state = _state(request).require_ready()
    assert state.frontend is not None
    tokens: list[int] = await state.frontend.run("tokenize", request.body)
    requested_lora(state, request.body)  # with LoRA on, `model` is checked here: an unknown name is a 404
    return json_response({"count": len(tokens), "max_model_len": state.model_context.max_model_len, "tokens": tokens,
                          "token_strs": None})


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

