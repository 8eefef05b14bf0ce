"""Logprobs in OpenAI's two formats: chat's `logprobs.content` (token, logprob, bytes, top_logprobs)
and the legacy completions object (tokens, token_logprobs, top_logprobs, text_offset)."""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from engine.outputs import Logprob

MIN_LOGPROB = -9999.0  # stands for -inf, which JSON cannot carry
SP_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte-fallback tokens


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte -> the byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + k): b for k, b in enumerate(shifted)}}


def _clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class TokenText:
    """Token id -> text, preferring the engine's decoded_token; and the name a logprob entry shows for it."""

    def __init__(self, tokenizer: Any, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids  # vLLM's return_tokens_as_token_ids: entries name tokens "token_id:{id}"

    def __call__(self, token_id: int, lp: Logprob | None = None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id])

    def name(self, token_id: int, text: str) -> str:
        """A logprob entry's token: its text, or "token_id:{id}" (a token that is part of a character has no
        text of its own); offsets and bytes stay the text's."""
        return f"token_id:{token_id}" if self.as_ids else text

    def utf8(self, token_id: int, text: str) -> list[int]:
        """A token's `bytes`: for a token that is part of a character (its text decodes to U+FFFD) the
        token's own bytes, from its byte-level BPE or <0xHH> piece, so that a client joining the bytes of
        consecutive tokens gets the character, as OpenAI intends; else the UTF-8 of its text."""
        if "\ufffd" in text and self.tokenizer is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece:
                alphabet = _byte_level_alphabet()
                m = SP_BYTE_TOKEN.fullmatch(piece)
                raw = (bytes([int(m.group(1), 16)]) if m else bytes(alphabet[c] for c in piece)
                       if all(c in alphabet for c in piece) else None)
                if raw is not None and raw.decode("utf-8", "replace") == text:  # the piece is the token's bytes
                    return list(raw)
        return list(text.encode("utf-8"))


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], top: int, detok: TokenText) -> dict:
    """A choice's `logprobs` object: per-token content; `refusal` is required and this server never refuses."""
    content = []
    for tid, lps in zip(token_ids, logprobs):
        chosen = lps.get(tid)
        token = detok(tid, chosen)
        tops = sorted(lps.items(), key=lambda kv: kv[1].rank)[:top]
        content.append({
            "token": detok.name(tid, token),
            "logprob": _clamp(chosen.logprob) if chosen is not None else MIN_LOGPROB,
            "bytes": detok.utf8(tid, token),
            "top_logprobs": [
                {"token": detok.name(i, t := detok(i, lp)), "logprob": _clamp(lp.logprob), "bytes": detok.utf8(i, t)}
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
        out["tokens"].append(detok.name(tid, token))
        out["text_offset"].append(offset)
        offset += len(token)
        if lps is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_clamp(chosen.logprob) if chosen is not None else MIN_LOGPROB)
        out["top_logprobs"].append({detok.name(i, detok(i, lp)): _clamp(lp.logprob) for i, lp in lps.items()
                                    if lp.rank <= top or i == tid})
    return out


def merge_completion_logprobs(a: dict[str, list] | None, b: dict[str, list]) -> dict[str, list]:
    """Two legacy-format pieces (echoed prompt, then generated tokens) as one."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def prompt_logprobs_json(logprobs: list[dict[int, Logprob] | None] | None,
                         detok: TokenText) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's prompt_logprobs: at each prompt position (null for the first) {token id: {logprob, rank,
    decoded_token}} for its top-k and its own token."""
    return [None if lps is None else {str(i): {"logprob": _clamp(lp.logprob), "rank": lp.rank,
                                                "decoded_token": detok(i, lp)} for i, lp in lps.items()}
            for lps in logprobs or []]
