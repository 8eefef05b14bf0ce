"""StructuredOutputsParams (vLLM's names): exactly one of json, regex, choice, grammar, json_object.

Checked at construction: the grammar is built (xgrammar, without a tokenizer; cached per spec), so a
schema, regex or EBNF that cannot compile fails as a SamplingParamsError naming the field, and the
engine core only ever sees constraints it can compile.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, fields
from typing import Any

from engine.structured.json_schema import json_schema_grammar
from engine.structured.reasoning import PARSERS
from engine.valid_text import unicode_problem

KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_SPEC_CHARS = 1_000_000  # a larger schema or grammar is refused before compiling


class StructuredOutputsError(ValueError):
    """A constraint that cannot be used; `param` names the field (structured_outputs.json, ...)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


@dataclass
class StructuredOutputsParams:
    json: str | dict[str, Any] | None = None  # a JSON schema (object or its text)
    regex: str | None = None  # the whole output matches it
    choice: list[str] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # EBNF / GBNF (xgrammar's dialect; root rule "root")
    json_object: bool | None = None  # any JSON object (OpenAI's response_format json_object)
    disable_any_whitespace: bool = False  # True: compact JSON (no whitespace between tokens)
    # the API server sets it from --reasoning-parser (chat): the constraint starts after the reasoning ends
    reasoning_parser: str | None = None
    enable_in_reasoning: bool = False  # constrain the <think> part too (vLLM's server-wide option, per request)

    def __post_init__(self) -> None:
        check_structured_outputs(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StructuredOutputsParams:
        """From a request's JSON object; an unknown key is named."""
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise StructuredOutputsError(f"structured_outputs.{key}",
                                             f"unknown field; known: {', '.join(sorted(known))}")
        return cls(**d)

    @property
    def kind(self) -> str:
        return _given(self)[0]

    def grammar_key(self) -> tuple[str, str]:
        """(kind, spec text): what the compiled grammar depends on, a cache key."""
        kind = self.kind
        if kind == "json":
            return kind, self.json_text() + ("" if not self.disable_any_whitespace else "\0compact")
        if kind == "choice":
            return "grammar", choice_ebnf(self.choice or [])
        if kind == "json_object":
            return kind, "compact" if self.disable_any_whitespace else ""
        return kind, getattr(self, kind)

    def json_text(self) -> str:
        """The schema as text, its keys in the order given (they set the order properties are generated in)."""
        return self.json if isinstance(self.json, str) else json.dumps(self.json)


def choice_ebnf(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly the given strings."""
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _clean(error: Exception) -> str:
    """xgrammar's message without its C++ source location and assertion prefixes, nor the copy of the whole
    schema it appends (up to MAX_SPEC_CHARS: the request's own text)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text)
    text = re.sub(r"^Check failed: \(.*?\) is false: ", "", text)
    return text.split(". The JSON string is:")[0]


@functools.lru_cache(maxsize=256)
def _build(kind: str, spec: str) -> None:
    """Build the grammar once per spec (no tokenizer needed); raises ValueError with xgrammar's reason."""
    import xgrammar as xgr  # imported on first use: it takes seconds

    try:
        if kind == "json":  # the grammar the engine core compiles (json_schema.py), cached there for it
            schema, _, compact = spec.partition("\0")
            json_schema_grammar(schema, not compact)  # positional, as the manager calls it: one cache entry
        elif kind == "regex":
            xgr.Grammar.from_regex(spec)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(spec)
    except Exception as e:  # xgrammar raises RuntimeError (and others) from C++ with the reason
        raise ValueError(_clean(e)) from None


def _given(p: StructuredOutputsParams) -> list[str]:
    """The constraints set: json_object false is off; json false is a schema (one that matches nothing)."""
    return [k for k in KINDS if getattr(p, k) is not None and not (k == "json_object" and getattr(p, k) is False)]


def check_structured_outputs(p: StructuredOutputsParams) -> None:
    """Types, exactly one constraint, and a grammar that compiles; else StructuredOutputsError."""
    given = _given(p)
    if len(given) != 1:
        raise StructuredOutputsError("structured_outputs", f"give exactly one of {', '.join(KINDS)}; got "
                                     f"{', '.join(given) or 'none'}")
    kind = given[0]
    param = f"structured_outputs.{kind}"
    value = getattr(p, kind)
    for name in ("disable_any_whitespace", "enable_in_reasoning"):
        if not isinstance(getattr(p, name), bool):
            raise StructuredOutputsError(f"structured_outputs.{name}", "must be true or false")
    if p.reasoning_parser is not None and p.reasoning_parser not in PARSERS:
        raise StructuredOutputsError("structured_outputs.reasoning_parser", f"unknown parser {p.reasoning_parser!r}; "
                                     f"choose one of {', '.join(PARSERS)}")
    if kind == "json":
        if isinstance(value, bool):  # JSON Schema's boolean schemas, as the text "true" is taken
            if not value:
                raise StructuredOutputsError(param, "the schema false matches no output")
            p.json = text = "true"  # as text: the engine core's message types take a schema as str or object
        elif isinstance(value, dict):
            try:
                text = json.dumps(value)
            except (TypeError, ValueError) as e:
                raise StructuredOutputsError(param, f"not a JSON schema: {e}") from None
            # kept as its text: one string to the engine core, whose message encoder refuses ints past 64 bits
            # (an annotation such as "description": 10**30 that the grammar ignores was a 500)
            p.json = text
        elif isinstance(value, str):
            text = value
            try:
                if not isinstance(json.loads(text), (dict, bool)):
                    raise StructuredOutputsError(param, "a JSON schema must be an object")
            except json.JSONDecodeError as e:
                raise StructuredOutputsError(param, f"not valid JSON: {e}") from None
        else:
            raise StructuredOutputsError(param, f"must be a JSON schema object, got {type(value).__name__}")
    elif kind == "json_object":
        if value is not True:
            raise StructuredOutputsError(param, "must be true or false")
        return
    elif kind == "choice":
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
            raise StructuredOutputsError(param, "must be a non-empty list of non-empty strings")
        p.choice = list(value)
        for i, c in enumerate(p.choice):  # the grammar escapes a lone surrogate; the engine core's encoder cannot
            if (problem := unicode_problem(c)) is not None:
                raise StructuredOutputsError(f"{param}[{i}]", problem)
        text = choice_ebnf(p.choice)
    else:
        if not isinstance(value, str) or not value:
            raise StructuredOutputsError(param, "must be a non-empty string")
        text = value
    if len(text) > MAX_SPEC_CHARS:
        raise StructuredOutputsError(param, f"at most {MAX_SPEC_CHARS} characters, got {len(text)}")
    build_kind, spec = p.grammar_key()
    try:
        _build(build_kind, spec)
    except ValueError as e:
        raise StructuredOutputsError(param, f"cannot be compiled: {e}") from None
