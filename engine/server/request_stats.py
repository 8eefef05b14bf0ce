"""One request's life as /metrics and the request log see it, in an API process: TrackedRequest (its
stream, arrival and token times) and what it observes when tokens come (TTFT, inter-token latency)
and when it ends (request_success, latency histograms, the "request ... finished" log line)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from engine.outputs import RequestOutput
from engine.server.metrics import ServerMetrics
from engine.server.request_stream import RequestStream

logger = logging.getLogger("gantry.server")


@dataclass(eq=False)
class TrackedRequest:
    stream: RequestStream  # where its deltas go
    arrival_time: float  # time.time() when its HTTP request arrived
    num_prompt_tokens: int
    n: int  # samples
    num_generated: int = 0  # tokens delivered so far, all samples together
    first_token_time: float | None = None  # time.time() when its first token was delivered
    last_token_time: float | None = None
    sent_prompt: bool = False  # its first delta (which carries the prompt) went out

    def observe_tokens(self, metrics: ServerMetrics, num_new: int, now: float) -> None:
        """num_new (> 0) tokens delivered at now: TTFT for the first, inter-token latency after it."""
        if self.last_token_time is not None:
            metrics.itl.observe(now - self.last_token_time)
        else:
            self.first_token_time = now
            metrics.observe_first_token(now - self.arrival_time)
        self.last_token_time = now
        self.num_generated += num_new


def observe_finished(metrics: ServerMetrics, request_id: str, t: TrackedRequest, reason: str,
                     out: RequestOutput | None, log_requests: bool) -> None:
    """The request ended: finished by the engine (out, its last output) or aborted here (out None)."""
    now = time.time()
    first_token = t.first_token_time
    ttft = first_token - t.arrival_time if first_token is not None else None
    m = out.metrics if out is not None else None
    queue = m.first_scheduled_time - t.arrival_time if m is not None and m.first_scheduled_time else None
    metrics.observe_finished(reason, now - t.arrival_time, queue)
    if log_requests:
        logger.info("request %s finished: prompt_tokens=%d generated_tokens=%d ttft=%s total=%.3fs "
                    "finish_reason=%s", request_id, t.num_prompt_tokens, t.num_generated,
                    f"{ttft:.3f}s" if ttft is not None else "-", now - t.arrival_time, reason)
