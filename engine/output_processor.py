"""What users see of a request: stop strings matched in the detokenized text, and RequestOutputs
(text that may still start a stop string held back), built by OutputProcessor from the engine
core's EngineCoreOutputs (token deltas) per SamplingParams.output_kind."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.core_messages import EngineCoreOutput
from engine.errors import RequestError
from engine.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput, SampleLogprobs
from engine.prompt_logprobs import extend_prompt_logprobs
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


# ---- the front end's side of the engine core (fed by EngineCoreOutputs) -------------------


@dataclass(eq=False)
class SampleState:
    """One sample's text state; token_ids and logprobs grow in place (never copied per step)."""

    index: int
    detokenizer: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float = 0.0
    text: str = ""  # stop string already cut
    num_sent_tokens: int = 0  # DELTA: what earlier outputs carried
    num_sent_chars: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(eq=False)
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    samples: list[SampleState]
    prompt_logprobs: PromptLogprobs | None = None
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    samples_to_abort: list[tuple[str, int]]  # (request id, index) stopped by a stop string: the core frees them


class OutputProcessor:
    """Turns the core's token deltas into RequestOutputs (per SamplingParams.output_kind):
    detokenization, stop strings and logprob texts. It owns the tokenizer; the core has none."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float) -> None:
        detok = self.tokenizer is not None and params.detokenize
        samples = [SampleState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
                               if detok else None, logprobs=[] if params.logprobs is not None else None)
                   for i in range(params.n)]
        self.requests[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, params, RequestMetrics(arrival_time), samples,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)

    def abort_requests(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.requests.pop(request_id, None)

    def process_outputs(self, outputs: list[EngineCoreOutput], final_only: bool = False) -> ProcessedOutputs:
        """final_only: the caller keeps finished requests' outputs only (the offline API), so a running
        request's RequestOutput is not built, unless DELTA (building one advances what was sent)."""
        touched: dict[str, RequestState] = {}  # batch order
        failed: list[RequestOutput] = []
        to_abort: list[tuple[str, int]] = []
        now = time.time()
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:
                continue  # aborted by the client while the step ran
            if out.error is not None:
                failed.append(self._fail(state, RequestError(*out.error) if out.error[0] else RuntimeError(out.error[1])))
                continue
            sample = state.samples[out.index]
            if sample.finish_reason is not None:
                continue  # ended here by a stop string (n > 1): the core ran it on until our abort arrived
            try:
                if self._apply(state, sample, out):
                    to_abort.append((out.request_id, out.index))
            except Exception as e:  # a tokenizer failure ends this request alone
                failed.append(self._fail(state, e))
                to_abort.append((out.request_id, -1))
                continue
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if out.first_scheduled_time is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = out.first_scheduled_time
            if out.new_token_ids:
                state.metrics.first_token_time = state.metrics.first_token_time or now
                state.metrics.last_token_time = now
            touched[out.request_id] = state
        request_outputs = failed
        for state in touched.values():
            if final_only and state.params.output_kind != RequestOutputKind.DELTA and not state.finished:
                continue  # as the caller would drop it (CUMULATIVE and FINAL_ONLY keep no per-output state)
            output = self._make_output(state)
            if output is not None:
                request_outputs.append(output)
            if state.finished:
                state.metrics.finished_time = now
                del self.requests[state.request_id]
        return ProcessedOutputs(request_outputs, to_abort)

    def _apply(self, state: RequestState, sample: SampleState, out: EngineCoreOutput) -> bool:
        """Fold one core output into a sample; True when a stop string ended it here (the core
        still runs it and must abort it)."""
        if out.new_prompt_logprobs is not None:
            first, entries = out.new_prompt_logprobs
            # detokenize=False: no decoded_token either (vLLM's), nor the decoding it costs
            extend_prompt_logprobs(state.prompt_logprobs, first, entries,
                                   self.tokenizer if state.params.detokenize else None)
        params, stopped_here = state.params, False
        if sample.detokenizer is None and (out.new_logprobs is None or sample.logprobs is None):
            sample.token_ids.extend(out.new_token_ids)  # no text, no logprobs: all the loop below would do
        else:
            stopped_here = self._apply_tokens(sample, params, out)
        if sample.finish_reason is None and out.finish_reason is not None:
            sample.finish_reason, sample.stop_reason = out.finish_reason, out.stop_reason
        if sample.finish_reason is not None and sample.detokenizer is not None and not isinstance(sample.stop_reason, str):
            sample.text += sample.detokenizer.flush()
        return stopped_here

    def _apply_tokens(self, sample: SampleState, params: SamplingParams, out: EngineCoreOutput) -> bool:
        """_apply's tokens one by one (logprob entries, text, stop strings); True when a stop string ended it."""
        for i, token_id in enumerate(out.new_token_ids):
            sample.token_ids.append(token_id)
            if out.new_logprobs is not None and sample.logprobs is not None:
                lp = out.new_logprobs[i]
                # vLLM's order: the sampled token first (with its own rank), then the top-k it is not among
                entry = {token_id: Logprob(lp.logprobs[0], lp.rank, self._decode_one(token_id, params))}
                for r, (t, v) in enumerate(zip(lp.token_ids[1:], lp.logprobs[1:]), 1):
                    if t != token_id:
                        entry[t] = Logprob(v, r, self._decode_one(t, params))
                sample.logprobs.append(entry)
                sample.cumulative_logprob += lp.logprobs[0]
            last = i == len(out.new_token_ids) - 1
            # a stop token (EOS, stop_token_ids) ends the text, but is in it with include_stop_str_in_output (vLLM's)
            if sample.detokenizer is not None and not (last and out.finish_reason == "stop"
                                                       and not params.include_stop_str_in_output):
                old_len = len(sample.text)
                sample.text += sample.detokenizer.add_tokens([token_id])
                # vLLM checks stop strings only once more than min_tokens tokens are out
                if params.stop and len(sample.token_ids) > params.min_tokens and _cut_at_stop(sample, params, old_len):
                    return out.finish_reason is None
        return False

    def _decode_one(self, token_id: int, params: SamplingParams) -> str | None:
        """A logprob entry's decoded_token: None with detokenize=False (vLLM's) or without a tokenizer."""
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None and params.detokenize else None

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        kind, finished = state.params.output_kind, state.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind == RequestOutputKind.DELTA
        completions = []
        for s in state.samples:
            end = len(s.text)
            if s.finish_reason is None and state.params.stop:  # what may still start a stop string
                end = max(s.num_sent_chars, end - max(len(x) for x in state.params.stop) + 1)
            if delta:
                completions.append(CompletionOutput(
                    s.index, s.text[s.num_sent_chars:end], s.token_ids[s.num_sent_tokens:],
                    s.cumulative_logprob if s.logprobs is not None else None,
                    s.logprobs[s.num_sent_tokens:] if s.logprobs is not None else None, s.finish_reason, s.stop_reason))
                s.num_sent_chars, s.num_sent_tokens = end, len(s.token_ids)
            else:  # the growing lists themselves: nothing copied per step
                completions.append(CompletionOutput(
                    s.index, s.text[:end], s.token_ids, s.cumulative_logprob if s.logprobs is not None else None,
                    s.logprobs, s.finish_reason, s.stop_reason))
        prompt_logprobs = state.prompt_logprobs
        if delta:
            prompt_logprobs = None if state.prompt_logprobs_sent else prompt_logprobs
            state.prompt_logprobs_sent = True
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, finished,
                             state.metrics, num_cached_tokens=state.num_cached_tokens, prompt_logprobs=prompt_logprobs)

    def _fail(self, state: RequestState, error: Exception) -> RequestOutput:
        self.requests.pop(state.request_id, None)
        state.metrics.finished_time = time.time()
        outputs = [CompletionOutput(s.index, s.text, s.token_ids, None, None, s.finish_reason or "abort")
                   for s in state.samples]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs, True, state.metrics,
                             error=error)


def _cut_at_stop(sample: SampleState, params: SamplingParams, old_len: int) -> bool:
    """check_stop_strings for a SampleState: cut at the earliest stop string past old_len."""
    search_from = max(0, old_len - max(len(s) for s in params.stop) + 1)
    best: tuple[int, str] | None = None
    for stop in params.stop:
        pos = sample.text.find(stop, search_from)
        if pos != -1 and (best is None or pos < best[0]):
            best = (pos, stop)
    if best is None:
        return False
    pos, stop = best
    sample.text = sample.text[: pos + len(stop)] if params.include_stop_str_in_output else sample.text[:pos]
    sample.finish_reason, sample.stop_reason = "stop", stop
    return True
