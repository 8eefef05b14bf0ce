"""Beam search on top of the engine, as vLLM v1 runs it: each step submits every live beam as a
one-token greedy request (prompt + beam tokens) asking for its top log-probabilities, and prefix
caching shares the beams' common KV pages. Beams are ranked, finished and scored as transformers'
`generate(num_beams=...)` does (length_penalty, early_stopping True / False / "never"). How a step
is run is pluggable: a sync function (offline LLM) or an async one (the API server)."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from engine.errors import RequestError
from engine.outputs import Logprob, RequestOutput
from engine.sampling_params import (
    MAX_LOGPROBS,
    RequestOutputKind,
    SamplingParams,
    SamplingParamsError,
    _bool,
    _float,
    _int,
)

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

logger = logging.getLogger("gantry.engine")

MAX_BEAM_WIDTH = 16  # a step asks each beam for beam_width + (number of EOS ids) logprobs: MAX_LOGPROBS caps it
# |length_penalty| above this could overflow a score: num_tokens ** 32 stays finite up to 2**31 tokens
MAX_LENGTH_PENALTY = 32.0

# One request of a step: (request id, prompt + beam token ids, its SamplingParams)
StepRequest = tuple[str, list[int], SamplingParams]
# What a step returns per request: (the greedy token, top log-probabilities {token id: logprob})
StepOutput = tuple[int, dict[int, float]]
SyncStep = Callable[[list[StepRequest]], list[StepOutput]]
AsyncStep = Callable[[list[StepRequest]], Awaitable[list[StepOutput]]]


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams, plus transformers' early_stopping."""

    beam_width: int  # beams kept at each step (transformers' num_beams); this many sequences come back
    max_tokens: int | None  # most tokens generated per beam; None: up to the context left
    ignore_eos: bool = False  # EOS does not end a beam
    temperature: float = 0.0  # only 0: beams are ranked by the model's own log-probabilities
    length_penalty: float = 1.0  # a finished beam scores cum_logprob / num_generated_tokens ** length_penalty
    early_stopping: bool | str = False  # True: stop once beam_width beams finished; False: heuristic; "never"
    include_stop_str_in_output: bool = False  # keep the EOS token's text in `text`

    def __post_init__(self) -> None:
        self.beam_width = _int("beam_width", self.beam_width)
        if self.max_tokens is not None:
            self.max_tokens = _int("max_tokens", self.max_tokens)
        self.ignore_eos = _bool("ignore_eos", self.ignore_eos)
        self.include_stop_str_in_output = _bool("include_stop_str_in_output", self.include_stop_str_in_output)
        self.temperature = _float("temperature", self.temperature)
        self.length_penalty = _float("length_penalty", self.length_penalty)
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise SamplingParamsError("beam_width", f"must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not -MAX_LENGTH_PENALTY <= self.length_penalty <= MAX_LENGTH_PENALTY:
            raise SamplingParamsError("length_penalty", f"must be in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}] "
                                                        f"(a score past that overflows), got {self.length_penalty}")
        if self.temperature != 0.0:
            raise SamplingParamsError("temperature", "beam search ranks beams by the model's log-probabilities; "
                                                     f"only 0 is supported, got {self.temperature}")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise SamplingParamsError("early_stopping", f"must be true, false or \"never\", got {self.early_stopping!r}")


@dataclass
class BeamSearchSequence:
    """One finished beam (vLLM's fields, plus transformers' length-penalized score)."""

    tokens: list[int]  # prompt + generated token ids
    num_prompt_tokens: int
    logprobs: list[dict[int, Logprob]]  # per generated token: its own logprob
    cum_logprob: float  # sum of the generated tokens' logprobs
    score: float  # cum_logprob / num generated tokens ** length_penalty (transformers' sequences_scores)
    finish_reason: str  # "stop" (EOS) or "length" (max_tokens)
    stop_reason: int | None = None  # the EOS id that ended it
    text: str | None = None  # generated text (EOS left out unless include_stop_str_in_output)

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens :]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


@dataclass
class _Beam:
    token_ids: list[int] = field(default_factory=list)  # generated so far
    logprobs: list[Logprob] = field(default_factory=list)  # each token's, with its rank at that step
    cum_logprob: float = 0.0


class BeamSearch:
    """One prompt's search state: transformers' `_beam_search` for a batch of one, fed one step
    of top log-probabilities at a time. `step_prompts()` are the token ids to score next,
    `advance()` takes each one's top logprobs, `done` says when `results()` are final."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: Iterable[int],
                 max_model_len: int):
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        num_prompt = len(self.prompt_token_ids)
        if params.max_tokens is not None and num_prompt + params.max_tokens > max_model_len:
            raise RequestError("max_tokens", f"this model's maximum context length is {max_model_len} tokens, but "
                                             f"{num_prompt} prompt tokens + max_tokens {params.max_tokens} exceed it")
        if num_prompt >= max_model_len:
            raise RequestError("prompt", f"the prompt has {num_prompt} tokens; this model's maximum context length "
                                         f"is {max_model_len}, which leaves no room to generate")
        self.max_tokens = params.max_tokens or max_model_len - num_prompt
        self.eos_token_ids = frozenset(() if params.ignore_eos else eos_token_ids)
        width = params.beam_width
        # transformers keeps the top (1 + #EOS) x width candidates so that width of them go on. Asking each
        # beam for its top width + #EOS is enough: it holds width non-EOS tokens, and an EOS ranked below
        # them in its own beam has width candidates above it, so it could not finish a beam either.
        self.num_logprobs = width + len(self.eos_token_ids)
        self.num_candidates = max(2, 1 + len(self.eos_token_ids)) * width
        if self.num_logprobs > MAX_LOGPROBS:
            raise SamplingParamsError("beam_width", f"with {len(self.eos_token_ids)} EOS tokens, at most "
                                                    f"{MAX_LOGPROBS - len(self.eos_token_ids)}, got {width}")
        self.running = [_Beam()]
        self.finished: list[tuple[float, _Beam, int | None]] = []  # (score, beam, EOS id or None), best first
        self.done = False

    def step_params(self) -> SamplingParams:
        """A step's request: one greedy token, with the top logprobs (raw log_softmax, as transformers)."""
        return SamplingParams(temperature=0.0, max_tokens=1, logprobs=self.num_logprobs, ignore_eos=True,
                              detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)

    def step_prompts(self) -> list[list[int]]:
        return [self.prompt_token_ids + beam.token_ids for beam in self.running]

    def _score(self, cum_logprob: float, num_tokens: int) -> float:
        return cum_logprob / (num_tokens ** self.params.length_penalty)

    def advance(self, top_logprobs: list[dict[int, float]]) -> None:
        """One step: top_logprobs[i] holds at least the top num_logprobs tokens after running beam i."""
        assert not self.done and len(top_logprobs) == len(self.running)
        p, width = self.params, self.params.beam_width
        num_generated = len(self.running[0].token_ids) + 1  # every running beam has the same length
        at_max = num_generated >= self.max_tokens
        candidates = sorted(((beam.cum_logprob + lp, beam, token, Logprob(lp, rank))
                             for beam, top in zip(self.running, top_logprobs)
                             for rank, (token, lp) in enumerate(sorted(top.items(), key=lambda kv: -kv[1]), 1)),
                            key=lambda c: -c[0])[: self.num_candidates]
        running: list[_Beam] = []
        for rank, (cum, beam, token, lp) in enumerate(candidates):
            child = _Beam(beam.token_ids + [token], beam.logprobs + [lp], cum)
            if at_max or token in self.eos_token_ids:
                if rank < width:  # only the top width candidates may finish (the rest are spares)
                    self.finished.append((self._score(cum, num_generated), child, None if at_max and token not in
                                          self.eos_token_ids else token))
            elif len(running) < width:
                running.append(child)
        self.finished = sorted(self.finished, key=lambda f: -f[0])[:width]
        self.running = running
        if at_max or not running:
            self.done = True
        elif len(self.finished) == width:
            # transformers' stopping rule: early_stopping=True stops once width beams finished; otherwise
            # stop when the best running beam could not beat the worst finished one (at its best length)
            best_len = self.max_tokens if p.early_stopping == "never" and p.length_penalty > 0 else num_generated
            best_possible = self._score(running[0].cum_logprob, best_len)
            self.done = p.early_stopping is True or best_possible <= self.finished[-1][0]

    def results(self) -> list[BeamSearchSequence]:
        """The finished beams, best first (beam_width of them, unless the vocabulary has fewer tokens)."""
        return [BeamSearchSequence(self.prompt_token_ids + b.token_ids, len(self.prompt_token_ids),
                                   [{t: lp} for t, lp in zip(b.token_ids, b.logprobs)], b.cum_logprob, score,
                                   "stop" if eos is not None else "length", eos)
                for score, b, eos in self.finished]


def search_requests(searches: list[BeamSearch], request_ids: Iterator[str]) -> tuple[list[StepRequest], list[int]]:
    """The next step's requests of every search not done, and how many belong to each."""
    requests: list[StepRequest] = []
    counts = []
    for search in searches:
        prompts = [] if search.done else search.step_prompts()
        params = search.step_params()
        requests.extend((next(request_ids), tokens, params) for tokens in prompts)
        counts.append(len(prompts))
    return requests, counts


def _advance_all(searches: list[BeamSearch], counts: list[int], outputs: list[StepOutput]) -> None:
    it = iter(outputs)
    for search, count in zip(searches, counts):
        if count:
            search.advance([top for _, top in itertools.islice(it, count)])


def run_beam_searches(searches: list[BeamSearch], step: SyncStep, request_ids: Iterator[str],
                      on_step: Callable[[], None] | None = None) -> None:
    """Drive searches to the end together, one batch of beams per step (the offline LLM)."""
    while not all(s.done for s in searches):
        requests, counts = search_requests(searches, request_ids)
        _advance_all(searches, counts, step(requests))
        if on_step is not None:
            on_step()


async def run_beam_search_async(search: BeamSearch, generate: AsyncStep, request_id: str) -> list[BeamSearchSequence]:
    """Drive one search with an async step (the server); cancelling it cancels the step in flight."""
    counter = itertools.count()
    while not search.done:
        step = next(counter)
        requests, counts = search_requests([search], (f"{request_id}-beam{step}.{i}" for i in itertools.count()))
        _advance_all([search], counts, await generate(requests))
    return search.results()


def engine_step(engine: LLMEngine) -> SyncStep:
    """A SyncStep on an offline LLMEngine: add the step's requests, step until each has its token.
    Anything raised (a refused request, an interrupt) aborts the ones not done, so no page stays held."""
    def step(requests: list[StepRequest]) -> list[StepOutput]:
        added: list[str] = []
        results: dict[str, StepOutput] = {}
        try:
            for request_id, token_ids, params in requests:
                engine.add_request(request_id, token_ids, params)
                added.append(request_id)
            while len(results) < len(requests):
                for out in engine.step():
                    if not out.finished or out.request_id not in added:
                        continue
                    if out.error is not None:
                        raise out.error
                    sample = out.outputs[0]
                    assert sample.logprobs is not None
                    results[out.request_id] = (sample.token_ids[0], {t: lp.logprob for t, lp in sample.logprobs[0].items()})
        except BaseException:
            engine.abort_request([r for r in added if r not in results])
            raise
        return [results[request_id] for request_id, _, _ in requests]

    return step


def beam_search_offline(engine: LLMEngine, prompts: list[list[int]], params: BeamSearchParams | list[BeamSearchParams],
                        request_ids: Iterator[str], use_tqdm: bool = True) -> list[BeamSearchOutput]:
    """LLM.beam_search: every prompt's search (params: one for all, or one per prompt) driven together
    on an offline engine, texts decoded."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise ValueError(f"params: {len(params_list)} given for {len(prompts)} prompts")
    searches = [BeamSearch(ids, p, engine.eos_token_ids, engine.max_model_len) for ids, p in zip(prompts, params_list)]
    if not engine.config.enable_prefix_caching:
        logger.warning("beam search without prefix caching recomputes every beam's prompt at every step")
    # a bar only on a terminal, as LLM.generate's
    with tqdm(total=len(searches), desc="Beam search", unit="req", disable=not use_tqdm or not sys.stderr.isatty()) as bar:
        run_beam_searches(searches, engine_step(engine), request_ids,
                          on_step=lambda: bar.update(sum(s.done for s in searches) - bar.n))
    outputs = [BeamSearchOutput(s.results()) for s in searches]
    if engine.tokenizer is not None:
        for out, p in zip(outputs, params_list):
            decode_sequences(out.sequences, engine.tokenizer, p.include_stop_str_in_output)
            name_logprob_tokens(out.sequences, engine.tokenizer)
    return outputs


def decode_sequences(sequences: list[BeamSearchSequence], tokenizer: Any, include_stop_str_in_output: bool) -> None:
    """Fill each sequence's text: its generated tokens without special tokens, the EOS token's text
    kept only with include_stop_str_in_output (vLLM's)."""
    for seq in sequences:
        body = seq.output_token_ids
        if seq.stop_reason is not None:
            body = body[:-1]
        seq.text = tokenizer.decode(body, skip_special_tokens=True)
        if seq.stop_reason is not None and include_stop_str_in_output:
            seq.text += tokenizer.decode([seq.stop_reason], skip_special_tokens=False)


def name_logprob_tokens(sequences: list[BeamSearchSequence], tokenizer: Any) -> None:
    """Each sequence's per-token Logprob.decoded_token, as vLLM's beams carry them (the steps run with
    detokenize=False, so they came back None)."""
    for seq in sequences:
        texts = tokenizer.batch_decode([[t] for t in seq.output_token_ids])
        for entry, text in zip(seq.logprobs, texts):
            for lp in entry.values():
                lp.decoded_token = text


# ---- best_of with sampling (vLLM's): best_of samples run, the n with the highest cumulative logprob return


def select_best_of(cumulative_logprobs: list[float], n: int) -> list[int]:
    """Indices of the n samples with the highest cumulative logprob, best first (ties: lower index)."""
    order = sorted(range(len(cumulative_logprobs)), key=lambda i: (-cumulative_logprobs[i], i))
    return order[:n]


def best_of_params(params: SamplingParams, max_num_seqs: int | None) -> SamplingParams:
    """What the engine runs for params: best_of samples, each with its cumulative logprob. max_num_seqs: the
    server's bound on best_of; None (offline LLM): none, they run max_num_seqs at a time as vLLM's."""
    if params.best_of is None or params.best_of == params.n:
        return params
    if max_num_seqs is not None and params.best_of > max_num_seqs:
        raise RequestError("best_of", f"must be at most max_num_seqs ({max_num_seqs}), got {params.best_of}")
    return dataclasses.replace(params, n=params.best_of, logprobs=0 if params.logprobs is None else params.logprobs)


def keep_best_of(output: RequestOutput, params: SamplingParams) -> RequestOutput:
    """output (run with best_of_params(params)) cut to the n best samples, re-indexed 0..n-1; per-token
    logprobs only if params asked for them."""
    if params.best_of is None or params.best_of == params.n or output.error is not None:
        return output
    samples = output.outputs
    best = select_best_of([s.cumulative_logprob if s.cumulative_logprob is not None else -math.inf for s in samples],
                          params.n)
    output.outputs = [dataclasses.replace(samples[i], index=j, logprobs=samples[i].logprobs if params.logprobs is not None
                                          else None) for j, i in enumerate(best)]
    return output
