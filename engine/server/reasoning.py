"""Reasoning parsers (`--reasoning-parser`): the text a reasoning model writes inside <think>...</think>
goes to `reasoning_content` (and vLLM's newer `reasoning`), the rest to `content`.

One streaming state machine serves whole texts and streamed deltas alike, so both split the same
way; a tag cut across deltas (tokens) is held back until it is complete or proven not to be one.
"""
from __future__ import annotations

from engine.structured.reasoning import END, PARSERS, START, ReasoningSpec, held_prefix


def check_reasoning_parser(name: str | None) -> None:
    """Raise ValueError naming the choices for an unknown parser name (None: no parser)."""
    if name is not None and name not in PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(sorted(PARSERS))}")


class ReasoningStream:
    """Feed a sample's text deltas; each feed returns (reasoning delta, content delta)."""

    def __init__(self, spec: ReasoningSpec):
        self.spec = spec
        self.phase = "start"  # "start": no text decided yet; then "reasoning"; then "content"
        self.held = ""  # text that may be the start of a tag

    @property
    def in_reasoning(self) -> bool:
        return self.phase != "content"

    def feed(self, delta: str) -> tuple[str, str]:
        text, self.held = self.held + delta, ""
        reasoning = content = ""
        if self.phase == "start":
            stripped = text.lstrip()
            if START.startswith(stripped) and len(stripped) < len(START):
                self.held = text  # "", or a part of "<think>"
                return "", ""
            if stripped.startswith(START):
                text, self.phase = stripped[len(START):], "reasoning"
            else:
                self.phase = "reasoning" if self.spec.start_optional else "content"
        if self.phase == "reasoning":
            at = text.find(END)
            if at < 0:
                keep = held_prefix(text, END)
                self.held = text[len(text) - keep:] if keep else ""
                return text[: len(text) - keep], ""
            reasoning, text, self.phase = text[:at], text[at + len(END):], "content"
        content = text
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """At the end: text held back as a possible tag is what it was (reasoning, or content)."""
        held, self.held = self.held, ""
        if self.phase == "start":
            self.phase = "reasoning" if self.spec.start_optional else "content"
        return (held, "") if self.phase == "reasoning" else ("", held)


def split_reasoning(spec: ReasoningSpec, text: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole output; None where a part is absent (as vLLM)."""
    stream = ReasoningStream(spec)
    r1, c1 = stream.feed(text)
    r2, c2 = stream.flush()
    reasoning, content = r1 + r2, c1 + c2
    saw_reasoning = stream.spec.start_optional or reasoning or text.lstrip().startswith(START)
    return (reasoning if saw_reasoning else None), (content or None)


def get_reasoning_spec(name: str | None) -> ReasoningSpec | None:
    return None if name is None else PARSERS[name]


def assistant_message(spec: ReasoningSpec | None, text: str) -> dict[str, object]:
    """The chat response's message: the text split by the parser (vLLM's fields, both names)."""
    if spec is None:
        return {"role": "assistant", "content": text, "refusal": None}
    reasoning, content = split_reasoning(spec, text)
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "reasoning": reasoning,
            "refusal": None}


class ReasoningDeltas:
    """Streamed chat deltas of every choice of one response, split by the parser."""

    def __init__(self, spec: ReasoningSpec):
        self.spec = spec
        self.streams: dict[int, ReasoningStream] = {}

    def delta(self, choice: int, new_text: str, finished: bool) -> dict[str, str]:
        stream = self.streams.get(choice)
        if stream is None:
            stream = self.streams[choice] = ReasoningStream(self.spec)
        reasoning, content = stream.feed(new_text)
        if finished:
            r, c = stream.flush()
            reasoning, content = reasoning + r, content + c
        out: dict[str, str] = {}
        if reasoning:
            out["reasoning_content"] = out["reasoning"] = reasoning
        if content:
            out["content"] = content
        return out
