"""The API's beam search and best_of (vLLM's extra fields): parsing use_beam_search, beam_width,
length_penalty and early_stopping; running a search through the route's async one-step
`generate` (engine/beam_search.py does the algorithm); and picking the best of best_of samples."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

from engine.beam_search import (
    AsyncStep,
    BeamSearch,
    BeamSearchParams,
    StepOutput,
    decode_sequences,
    run_beam_search_async,
    select_best_of,
)
from engine.outputs import Logprob
from engine.sampling_params import SamplingParams, SamplingParamsError
from engine.server.protocol import ModelContext, _bool, _float, _int, bad, show

__all__ = ["BeamResult", "best_of_order", "parse_beam_search", "run_beam_search", "run_beam_search_all",
           "select_best_of", "step_generate", "step_output"]

# AsyncLLM.generate's shape: (requests, arrival time) -> a context yielding the requests' deltas, which
# aborts whatever is unfinished when left early
Submit = Callable[[list[tuple[str, list[int], SamplingParams]], float], AbstractAsyncContextManager[AsyncIterable[Any]]]

# sampling fields that mean nothing to a deterministic beam search: refused unless neutral, never ignored
_NOT_WITH_BEAMS: dict[str, tuple[Any, ...]] = {
    "temperature": (0,), "top_p": (1,), "top_k": (0, -1), "min_p": (0,), "presence_penalty": (0,),
    "frequency_penalty": (0,), "repetition_penalty": (1,), "min_tokens": (0,), "stop": ("", []),
    "stop_token_ids": ([],), "logit_bias": ({},),
    # constraints a beam's greedy steps do not apply (they came back broken with a 200: fuzzing the API)
    "structured_outputs": (), "response_format": ({"type": "text"},), "tools": ([],), "tool_choice": ("none",),
}


def parse_beam_search(body: dict, ctx: ModelContext, params: SamplingParams, stream: bool,
                      logprobs_field: str | None) -> BeamSearchParams | None:
    """The search a request asks for (width: beam_width, else best_of, else n), or None to sample;
    then best_of is checked against stream. params: the request's SamplingParams (n, max_tokens,
    ignore_eos...); logprobs_field: the field that asked for logprobs, if any."""
    if not _bool(body, "use_beam_search"):
        for name, neutral in (("beam_width", ()), ("length_penalty", (1,)), ("early_stopping", (False,))):
            if body.get(name) is not None and body[name] not in neutral:
                raise bad(name, "only applies with use_beam_search")
        if stream and params.best_of is not None and params.best_of > params.n:
            raise bad("best_of", "must equal n when stream is true (the best samples are known only at the end)")
        return None
    if stream:
        raise bad("stream", "beam search cannot stream (beams change until the search ends); set stream to false")
    if logprobs_field is not None:
        raise bad(logprobs_field, "not supported with use_beam_search")
    for name, neutral in _NOT_WITH_BEAMS.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise bad(name, "not supported with use_beam_search (beams are ranked by the model's log-probabilities)")
    field = next((f for f in ("beam_width", "best_of") if body.get(f) is not None), "n")
    width = _int(body, field)
    width = 1 if width is None else width
    if width < 1:
        raise bad(field, f"must be >= 1, got {width}")
    if field == "beam_width" and body.get("best_of") is not None and _int(body, "best_of") != width:
        raise bad("best_of", f"must equal beam_width ({width}) with use_beam_search, got {show(body['best_of'])}")
    if width < params.n:
        raise bad(field, f"must be >= n ({params.n}): n of the beams are returned, got {width}")
    if ctx.max_num_seqs is not None and width > ctx.max_num_seqs:
        raise bad(field, f"must be at most max_num_seqs ({ctx.max_num_seqs}), got {width}")
    early_stopping = body.get("early_stopping")
    if not (early_stopping is None or isinstance(early_stopping, bool) or early_stopping == "never"):
        raise bad("early_stopping", f"must be true, false or \"never\", got {show(early_stopping)}")
    length_penalty = _float(body, "length_penalty")
    try:
        return BeamSearchParams(
            beam_width=width, max_tokens=params.max_tokens, ignore_eos=params.ignore_eos,
            length_penalty=1.0 if length_penalty is None else length_penalty,
            early_stopping=bool(early_stopping) if early_stopping != "never" else "never",
            include_stop_str_in_output=params.include_stop_str_in_output)
    except SamplingParamsError as e:
        raise bad(field if e.param == "beam_width" else e.param, str(e).split(": ", 1)[-1]) from None


@dataclass
class BeamResult:
    """One returned beam, as a choice needs it."""

    text: str
    token_ids: list[int]  # generated ids (the EOS that ended it included)
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty: the ranking
    finish_reason: str  # "stop" | "length"
    stop_reason: int | None  # the EOS id that ended it


async def run_beam_search(generate: AsyncStep, prompt_token_ids: list[int], params: BeamSearchParams, n: int, *,
                          eos_token_ids: Sequence[int], max_model_len: int, tokenizer: Any,
                          request_id: str, default_max_tokens: int | None = None) -> list[BeamResult]:
    """The n best beams for one prompt. generate runs one step: it submits each (request id, token ids,
    SamplingParams) to the engine and returns step_output() of each once finished, in order; it must
    abort its requests when cancelled (a client that leaves cancels this coroutine). A bad request
    raises RequestError naming the field (max_tokens, prompt) before anything is submitted.
    default_max_tokens: a request without max_tokens generates at most this many, within the context left
    (as sampling does; the generation config's max_new_tokens)."""
    if params.max_tokens is None and default_max_tokens and len(prompt_token_ids) < max_model_len:
        params = replace(params, max_tokens=min(default_max_tokens, max_model_len - len(prompt_token_ids)))
    search = BeamSearch(prompt_token_ids, params, eos_token_ids, max_model_len)
    sequences = (await run_beam_search_async(search, generate, request_id))[:n]
    if tokenizer is not None:
        decode_sequences(sequences, tokenizer, params.include_stop_str_in_output)
    return [BeamResult(s.text or "", s.output_token_ids, s.cum_logprob, s.score, s.finish_reason, s.stop_reason)
            for s in sequences]


async def run_beam_search_all(generate: AsyncStep, prompts: list[list[int]], params: BeamSearchParams, n: int, *,
                              eos_token_ids: Sequence[int], max_model_len: int, tokenizer: Any,
                              request_id: str, default_max_tokens: int | None = None) -> list[list[BeamResult]]:
    """run_beam_search for each prompt of one API request, concurrently (their steps batch in the
    engine); the first failure (a refused prompt) cancels the others and is raised."""
    tasks = [asyncio.ensure_future(run_beam_search(generate, ids, params, n, eos_token_ids=eos_token_ids,
                                                   max_model_len=max_model_len, tokenizer=tokenizer,
                                                   request_id=f"{request_id}-{i}",
                                                   default_max_tokens=default_max_tokens))
             for i, ids in enumerate(prompts)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their steps in flight abort before this returns
        raise


def step_output(token_ids: list[int], logprobs: list[dict[int, Logprob]]) -> StepOutput:
    """A finished one-token step request's output (its CompletionOutput's token_ids and logprobs) as
    generate returns it."""
    return token_ids[0], {t: lp.logprob for t, lp in logprobs[0].items()}


def step_generate(submit: Submit) -> AsyncStep:
    """The AsyncStep run_beam_search needs, over the API's engine (submit: AsyncLLM.generate). A step's
    requests go in as one stream; a cancelled search leaves it early, which aborts them."""
    async def generate(requests: list[tuple[str, list[int], SamplingParams]]) -> list[StepOutput]:
        token_ids: dict[str, list[int]] = {rid: [] for rid, _, _ in requests}
        logprobs: dict[str, list[dict[int, Logprob]]] = {rid: [] for rid, _, _ in requests}
        async with submit(list(requests), time.time()) as stream:
            async for delta in stream:
                for sample in delta.samples:
                    token_ids[delta.request_id].extend(sample.new_token_ids)
                    logprobs[delta.request_id].extend(sample.new_logprobs or [])
        if any(not ids for ids in token_ids.values()):  # aborted by the engine (shutting down)
            raise ConnectionAbortedError("the engine stopped before the beam search ended")
        return [step_output(token_ids[rid], logprobs[rid]) for rid, _, _ in requests]

    return generate


def best_of_order(samples: Sequence[tuple[list[int], list[dict[int, Logprob]]]], n: int) -> list[int]:
    """Which n of best_of samples (each its token ids and per-token logprobs, as the route collects
    them) to return, best first: the highest cumulative logprob (vLLM's best_of)."""
    return select_best_of([sum(entry[t].logprob for t, entry in zip(ids, lps)) for ids, lps in samples], n)
