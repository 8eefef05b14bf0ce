"""Structured-output fields of a request: OpenAI's `response_format` (text, json_object, json_schema)
and vLLM's `structured_outputs` extra field, as one StructuredOutputsParams.

A constraint that cannot compile is a 400 naming the field the client wrote (`response_format...`
or `structured_outputs...`), checked here before the request reaches the engine.
"""
from __future__ import annotations

from typing import Any

from engine.server.protocol import bad, show
from engine.structured.params import StructuredOutputsError, StructuredOutputsParams


def _from_response_format(fmt: Any) -> StructuredOutputsParams | None:
    if not isinstance(fmt, dict):
        raise bad("response_format", f"must be an object with a `type`, got {show(fmt)}")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise bad("response_format.json_schema", "is required with type json_schema and must be an object "
                                                     "with `name` and `schema`")
        schema = spec.get("schema")
        if schema is None:  # OpenAI's name; some clients send it as json_schema.json_schema
            schema = spec.get("json_schema")
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema", f"must be a JSON schema object, got {show(schema)}")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise bad("response_format.json_schema.strict", f"must be true or false, got {show(strict)}")
        try:
            return StructuredOutputsParams(json=schema)
        except StructuredOutputsError as e:
            raise bad("response_format.json_schema.schema", e.message) from None
    raise bad("response_format.type", f"must be one of text, json_object, json_schema, got {show(kind)}")


def structured_outputs_params(body: dict) -> StructuredOutputsParams | None:
    """The request's constraint (at most one of the two fields), or None."""
    fmt, so = body.get("response_format"), body.get("structured_outputs")
    if so is not None:
        if fmt is not None and fmt != {"type": "text"}:
            raise bad("structured_outputs", "give either response_format or structured_outputs, not both")
        if not isinstance(so, dict):
            raise bad("structured_outputs", f"must be an object, got {show(so)}")
        if "reasoning_parser" in so:
            raise bad("structured_outputs.reasoning_parser", "is the server's (--reasoning-parser)")
        try:
            return StructuredOutputsParams.from_dict(so)
        except StructuredOutputsError as e:
            raise bad(e.param, e.message) from None
        except TypeError as e:  # a field of the wrong type that the dataclass itself refused
            raise bad("structured_outputs", str(e)) from None
    return None if fmt is None else _from_response_format(fmt)


def constrain_after_reasoning(params: Any, reasoning_parser: str | None) -> None:
    """A chat request's constraint, if any, starts where the server's reasoning parser ends the
    reasoning: it applies to what comes back as `content` (params: SamplingParams, in place)."""
    if reasoning_parser is not None and params.structured_outputs is not None:
        params.structured_outputs.reasoning_parser = reasoning_parser
