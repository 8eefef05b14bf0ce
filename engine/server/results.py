"""What a streamed or whole HTTP request has generated so far: the engine's per-step deltas folded
into text, token ids and logprobs per sample (several prompts, n samples each)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.outputs import Logprob
from engine.server.request_stream import RequestDelta


@dataclass
class Sample:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestResults:
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # when echo asked for logprobs
    samples: list[Sample] = field(default_factory=list)


class Results:
    """Everything generated so far for one HTTP request (several prompts, n samples each)."""

    def __init__(self, request_ids: list[str], n: int):
        self.order = {rid: i for i, rid in enumerate(request_ids)}
        self.requests = [RequestResults(samples=[Sample() for _ in range(n)]) for _ in request_ids]
        self.n = n

    def apply(self, delta: RequestDelta) -> list[tuple[int, Sample, str, int]]:
        """Fold a delta in; returns (choice index, sample, new text, number of new tokens) per changed sample."""
        p = self.order[delta.request_id]
        req = self.requests[p]
        if delta.prompt_token_ids is not None:
            # the prompt as the client sent it, when known (the engine only saw its token ids)
            req.prompt, req.prompt_token_ids = req.prompt or delta.prompt or "", delta.prompt_token_ids
            req.prompt_logprobs = delta.prompt_logprobs
        changed = []
        for d in delta.samples:
            s = req.samples[d.index]
            new_text = d.text or ""  # deltas carry only what is new
            s.text += new_text
            s.token_ids.extend(d.new_token_ids)
            if d.new_logprobs:
                s.logprobs.extend(d.new_logprobs)
            if d.finish_reason is not None:
                s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
            if new_text or d.new_token_ids or d.finish_reason is not None:
                changed.append((p * self.n + d.index, s, new_text, len(d.new_token_ids)))
        return changed

    def apply_all(self, deltas: list[RequestDelta]) -> list[tuple[int, Sample, str, int]]:
        """Fold in every delta queued since the last write; one entry per changed sample with its
        new text and token count merged, so a stream that fell behind the engine by several steps
        gets one SSE event per write (as vLLM's output collector merges), not a burst of them."""
        merged: dict[int, tuple[int, Sample, str, int]] = {}
        for delta in deltas:
            for choice, s, new_text, num_new in self.apply(delta):
                _, _, text, num = merged.get(choice, (choice, s, "", 0))
                merged[choice] = (choice, s, text + new_text, num + num_new)
        return list(merged.values())

    def usage(self) -> dict[str, int]:
        prompt = sum(len(r.prompt_token_ids) for r in self.requests)
        completion = sum(len(s.token_ids) for r in self.requests for s in r.samples)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
