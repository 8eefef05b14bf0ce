"""Shared plumbing of the generation routes (engine/server/openai.py): submit requests to the AsyncEngine
and hand their stream to a responder, read its deltas, frame SSE chunks, turn engine refusals and failures
into APIErrors, and the best_of and beam-search steps both APIs share.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from sanic import Request

from engine.beam_search import BeamSearchParams, best_of_params
from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams
from engine.server.async_llm import PromptInput
from engine.server.beam import BeamResult, best_of_order, run_beam_search_all, step_generate
from engine.server.protocol import APIError
from engine.server.request_stream import RequestDelta, RequestStream
from engine.server.results import Results, Sample

if TYPE_CHECKING:
    from engine.server.app import ServerState

logger = logging.getLogger("gantry.server")

# JSON may carry U+0085, U+2028 and U+2029 raw, but line readers that follow str.splitlines (httpx's
# iter_lines) end an SSE line there: a token that decodes to one cut its chunk in two. Escaped, they are
# the same JSON string.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def one_line(text: str) -> str:
    return text if text.isascii() else text.translate(_LINE_BREAKS)  # isascii: the common case, no table walk


def sse(data: dict[str, Any] | str) -> str:
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(',', ':'))
    return f"data: {one_line(body)}\n\n"


def engine_error(e: Exception, prompt_param: str) -> APIError:
    param = getattr(e, "param", None)
    if isinstance(e, ValueError) and param is not None:
        if param == "prompt":
            param = prompt_param
        message = str(e).split(": ", 1)[-1]
        return APIError(400, f"{param}: {message}", param=param)
    if isinstance(e, ConnectionAbortedError):
        return APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
    logger.error("engine failed a request: %s: %s", type(e).__name__, e, exc_info=e)
    return APIError(500, "internal server error: the engine failed", code="internal_error")


async def submit(request: Request, state: ServerState, requests: list[tuple[str, PromptInput, SamplingParams]],
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
        raise engine_error(e, prompt_param) from None


async def iterate(stream: RequestStream, prompt_param: str) -> AsyncIterator[RequestDelta]:
    try:
        async for delta in stream:
            yield delta
    except APIError:
        raise
    except Exception as e:  # the engine loop died or is shutting down
        raise engine_error(e, prompt_param) from None


async def stream_started(stream: RequestStream, prompt_param: str) -> None:
    """Before the SSE headers: the first delta has come, or its failure is raised as an APIError."""
    try:
        await stream.first()
    except Exception as e:
        raise engine_error(e, prompt_param) from None


async def iterate_sse(response: Any, stream: RequestStream, prompt_param: str) -> AsyncIterator[list[RequestDelta]]:
    """The deltas queued since the last write, once the SSE headers are out: a failure becomes an
    error event."""
    try:
        async for batch in stream.batches():
            yield batch
    except APIError as e:
        await response.send(sse(e.body()))
    except Exception as e:  # the engine core died or the server is shutting down
        await response.send(sse(engine_error(e, prompt_param).body()))


_encode_json = msgspec.json.Encoder().encode


def json_field(value: Any) -> str:
    """JSON text of a chunk's field (UTF-8 kept as is, like json.dumps(ensure_ascii=False), ~10x faster;
    line separators escaped, as sse does)."""
    return one_line(_encode_json(value).decode())


def sse_head(obj: str, cid: str, created: int, model: str) -> str:
    """The start of every chunk of a stream, up to its choices (the one part that changes)."""
    return f'data: {{"id":{json_field(cid)},"object":"{obj}","created":{created},"model":{json_field(model)},"choices":['


async def beam_search(state: ServerState, prompts: list[list[int]], beam: BeamSearchParams, n: int, cid: str,
                       prompt_param: str) -> list[list[BeamResult]]:
    """use_beam_search: each prompt's n best beams (engine/server/beam.py), each step's requests
    through the same AsyncLLM.generate as sampling; refusals become 400s naming the field."""
    num_beams = beam.beam_width * len(prompts)  # each step: one engine request a beam
    state.check_capacity(num_beams, num_beams, "beam_width")
    info = state.model_info
    try:
        return await run_beam_search_all(
            step_generate(state.engine.generate), prompts, beam, n, eos_token_ids=sorted(state.engine.eos_token_ids),
            max_model_len=info.max_model_len, tokenizer=state.frontend.tokenizer, request_id=cid,
            default_max_tokens=info.default_max_tokens)
    except APIError:
        raise
    except Exception as e:  # a refusal, or (as in iterate) the engine died or the server is shutting down
        raise engine_error(e, prompt_param) from None


def beam_usage(prompts: list[list[int]], beams: list[list[BeamResult]]) -> dict[str, int]:
    prompt = sum(len(p) for p in prompts)
    completion = sum(len(b.token_ids) for per_prompt in beams for b in per_prompt)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def best_of_sampling(state: ServerState, params: SamplingParams) -> SamplingParams:
    try:
        return best_of_params(params, state.model_info.max_num_seqs)
    except ValueError as e:  # RequestError naming best_of
        raise engine_error(e, "prompt") from None


def keep_best_of(results: Results, n: int) -> None:
    """best_of > n: of each prompt's best_of samples keep the n with the highest cumulative logprob."""
    for r in results.requests:
        r.samples = [r.samples[i] for i in best_of_order([(s.token_ids, s.logprobs) for s in r.samples], n)]
    results.n = n


def usage_so_far(prompt_token_ids: list[int], sample: Sample | None) -> dict[str, int]:
    """stream_options.continuous_usage_stats: a chunk's usage, its choice's tokens so far (as vLLM's)."""
    prompt, completion = len(prompt_token_ids), 0 if sample is None else len(sample.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def collect(stream: RequestStream, results: Results, prompt_param: str) -> None:
    async for delta in iterate(stream, prompt_param):
        results.apply(delta)
