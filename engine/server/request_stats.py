"""One request's life as /metrics and the request log see it, in an API process: TrackedRequest (its
stream, arrival, tokens and token times) and what it observes when tokens come (TTFT, inter-token
latency) and when it ends (request_success, vLLM's per-request histograms, the "request ... finished"
log line)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, RequestOutput
from engine.server.metrics import FinishedRequestStats, ServerMetrics
from engine.server.request_stream import RequestStream

logger = logging.getLogger("gantry.server")


@dataclass(eq=False)
class TrackedRequest:
    stream: RequestStream  # where its deltas go
    arrival_time: float  # time.time() when its HTTP request arrived
    num_prompt_tokens: int
    n: int  # samples
    max_tokens: int  # as the engine runs it (resolved when the client gave none)
    num_sample_tokens: list[int] = field(init=False)  # [n]: tokens delivered so far per sample
    first_token_time: float | None = None  # time.time() when its first token was delivered
    last_token_time: float | None = None
    sent_prompt: bool = False  # its first delta (which carries the prompt) went out

    def __post_init__(self) -> None:
        self.num_sample_tokens = [0] * self.n

    @property
    def num_generated(self) -> int:
        return sum(self.num_sample_tokens)

    def observe_tokens(self, metrics: ServerMetrics, outputs: list[CompletionOutput], now: float) -> None:
        """A delta's samples (DELTA outputs: only what is new) delivered at now: TTFT at the first
        token, inter-token latency after it."""
        num_new = 0
        for o in outputs:
            self.num_sample_tokens[o.index] += len(o.token_ids)
            num_new += len(o.token_ids)
        if not num_new:
            return
        if self.last_token_time is not None:
            metrics.itl.observe(now - self.last_token_time)
        else:
            self.first_token_time = now
            metrics.observe_first_token(now - self.arrival_time)
        self.last_token_time = now


def finished_stats(t: TrackedRequest, out: RequestOutput) -> FinishedRequestStats:
    """vLLM's definitions: queued = arrival -> first scheduled, prefill = first scheduled -> first token,
    decode = first token -> last token, inference = first scheduled -> last token (the core's scheduling
    clock and the output processor's token times are both time.time() on this host)."""
    m = out.metrics
    scheduled = m.first_scheduled_time if m is not None else None
    first, last = (m.first_token_time, m.last_token_time) if m is not None else (None, None)
    ran = scheduled is not None and first is not None and last is not None
    return FinishedRequestStats(
        num_prompt_tokens=t.num_prompt_tokens, num_generation_tokens=t.num_generated,
        max_num_generation_tokens=max(t.num_sample_tokens), n=t.n, max_tokens=t.max_tokens,
        queued_time=scheduled - t.arrival_time if scheduled is not None else None,
        prefill_time=first - scheduled if ran else None, decode_time=last - first if ran else None,
        inference_time=last - scheduled if ran else None)


def observe_finished(metrics: ServerMetrics, request_id: str, t: TrackedRequest, reason: str,
                     out: RequestOutput | None, log_requests: bool) -> None:
    """The request ended: finished by the engine (out, its last output) or aborted here (out None:
    counted in request_success and e2e latency, left out of vLLM's per-request histograms as vLLM does)."""
    now = time.time()
    first_token = t.first_token_time
    ttft = first_token - t.arrival_time if first_token is not None else None
    metrics.observe_finished(reason, now - t.arrival_time, finished_stats(t, out) if out is not None else None)
    if log_requests:
        logger.info("request %s finished: prompt_tokens=%d generated_tokens=%d ttft=%s total=%.3fs "
                    "finish_reason=%s", request_id, t.num_prompt_tokens, t.num_generated,
                    f"{ttft:.3f}s" if ttft is not None else "-", now - t.arrival_time, reason)
