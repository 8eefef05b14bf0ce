"""Reasoning and grammars: a constraint applies to what the API returns as `content`, so with a reasoning
parser a sample's grammar starts at the first byte after `</think>` (vLLM's structured output manager
asks its reasoner's is_reasoning_end). ReasoningGate follows one sample's tokens as bytes, the way the
API's parser (engine/server/reasoning.py) splits their text, so a tag cut across tokens is found too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is the engine core's: SamplingParams imports this module in the API process
    import torch

START, END = "<think>", "</think>"
_START, _END = START.encode(), END.encode()


@dataclass(frozen=True)
class ReasoningSpec:
    name: str
    start_optional: bool  # deepseek_r1: the chat template already opened <think>, so text before any tag reasons


PARSERS = {
    "deepseek_r1": ReasoningSpec("deepseek_r1", start_optional=True),
    "qwen3": ReasoningSpec("qwen3", start_optional=False),  # no <think> first: the whole answer is content
}


def held_prefix(text: str | bytes, tag: str | bytes) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (it may be its start)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkTokens:
    """One tokenizer's token bytes, and the tokens that open `<think>` whole (qwen3's start)."""

    def __init__(self, decoded_vocab: list[bytes], vocab_size: int, stop_token_ids: set[int]):
        self.vocab = decoded_vocab  # token id -> its bytes (xgrammar's TokenizerInfo.decoded_vocab)
        self.words = (vocab_size + 31) // 32  # a bitmask row's int32 words
        self.stop_token_ids = stop_token_ids
        self._opening: torch.Tensor | None = None  # [words] int32, built at the first qwen3 request

    def bytes_of(self, token_id: int) -> bytes:
        return self.vocab[token_id] if token_id < len(self.vocab) else b""

    def opening_row(self) -> torch.Tensor:
        """[words] int32: the tokens that hold all of `<think>` after any whitespace. Reasoning models have
        it as one token; a path through its pieces (`<`, `think`, `>`) is left to the grammar, or a model
        that never reasons would be led into `<` wherever the grammar allows few tokens."""
        import torch

        if self._opening is None:
            words = [0] * self.words
            for token_id, data in enumerate(self.vocab):
                if data.lstrip().startswith(_START) and token_id not in self.stop_token_ids:
                    words[token_id >> 5] |= 1 << (token_id & 31)
            self._opening = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)
        return self._opening


class ReasoningGate:
    """One sample's place around its reasoning: "start" (qwen3: not yet known whether it opens <think>),
    "reasoning" (unconstrained) or "content" (the grammar applies)."""

    def __init__(self, spec: ReasoningSpec, tokens: ThinkTokens):
        self.tokens = tokens
        self.phase = "reasoning" if spec.start_optional else "start"
        # start: whitespace and a part of <think> (the matcher took them too: they may be content);
        # reasoning: a possible part of </think>
        self.held = b""

    @property
    def constrained(self) -> bool:
        return self.phase != "reasoning"

    def start_row(self) -> torch.Tensor | None:
        """Before any content: the tokens that open <think>, allowed beside the grammar's."""
        return self.tokens.opening_row() if self.phase == "start" and not self.held.lstrip() else None

    def accept(self, token_id: int, matcher: Any) -> bool:
        """Advance with one sampled token; False when the grammar refused content it had to take."""
        if self.phase == "content":
            return matcher.accept_token(token_id)
        data = self.tokens.bytes_of(token_id)
        if self.phase == "start":
            text = self.held + data
            stripped = text.lstrip()
            if not stripped.startswith(_START):  # a token the grammar allowed
                if not matcher.accept_token(token_id):
                    self.phase = "content"
                    return False
                if _START.startswith(stripped):  # whitespace or a part of <think> the grammar allowed: undecided
                    self.held = text
                else:
                    self.phase, self.held = "content", b""  # the API's parser makes all of it content
                return True
            matcher.reset()  # <think> opened: the grammar waits for what follows </think>
            self.phase, self.held, data = "reasoning", b"", stripped[len(_START):]
        text = self.held + data
        at = text.find(_END)
        if at < 0:
            keep = held_prefix(text, _END)
            self.held = text[len(text) - keep:] if keep else b""
            return True
        rest = text[at + len(_END):]  # the token that ends </think> may carry content
        self.phase, self.held = "content", b""
        return not rest or matcher.accept_string(rest)
