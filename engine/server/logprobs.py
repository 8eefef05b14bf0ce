"""Logprobs in OpenAI's two formats: chat's `logprobs.content` (token, logprob, bytes, top_logprobs)
and the legacy completions object (tokens, token_logprobs, top_logprobs, text_offset)."""
from __future__ import annotations

from typing import Any

from engine.outputs import Logprob

MIN_LOGPROB = -9999.0  # stands for -inf, which JSON cannot carry


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class TokenText:
    """Token id -> text, preferring the engine's decoded_token."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int, lp: Logprob | None = None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top: int, detok: TokenText) -> dict:
    """A choice's `logprobs` object: per-token content; `refusal` is required and this server never refuses."""
    content = []
    for tid, lps in zip(token_ids, logprobs):
        chosen = lps.get(tid)
        token = detok(tid, chosen)
        tops = sorted(lps.items(), key=lambda kv: kv[1].rank)[:top]
        content.append({
            "token": token,
            "logprob": _clamp(chosen.logprob) if chosen is not None else MIN_LOGPROB,
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := detok(i, lp)), "logprob": _clamp(lp.logprob), "bytes": list(t.encode("utf-8"))}
                for i, lp in tops
            ],
        })
    return {"content": content, "refusal": None}


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, top: int,
                         detok: TokenText, offset: int) -> dict[str, list]:
    """Legacy format; a position without logprobs (the first prompt token) gives nulls, as OpenAI's."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, tid in enumerate(token_ids):
        lps = logprobs[k] if logprobs is not None and k < len(logprobs) else None
        chosen = lps.get(tid) if lps is not None else None
        token = detok(tid, chosen)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        if lps is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_clamp(chosen.logprob) if chosen is not None else MIN_LOGPROB)
        out["top_logprobs"].append({detok(i, lp): _clamp(lp.logprob) for i, lp in lps.items()
                                    if lp.rank <= top or i == tid})
    return out


def merge_completion_logprobs(a: dict[str, list] | None, b: dict[str, list]) -> dict[str, list]:
    """Two legacy-format pieces (echoed prompt, then generated tokens) as one."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}
