"""Tool calling on chat: `tools`, `tool_choice` and `parallel_tool_calls` checked, the constraint that
enforces `required` or a named function (structured outputs), and the tool-call parsers of
`--tool-call-parser` (hermes, llama3_json, mistral) that turn a model's text into `tool_calls`.

HermesStream reads whole hermes outputs: text that may open `<tool_call>` is held back until it does or
cannot; a call is parsed once its `</tool_call>` arrives. Streamed calls: tool_stream.py.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.server.protocol import bad, check_depth, show
from engine.structured.params import StructuredOutputsError, StructuredOutputsParams

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's function names
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


@dataclass
class ToolsRequest:
    tools: list[dict[str, Any]]  # OpenAI function tools, as sent (for the chat template)
    tool_choice: str  # "auto" | "required" | "named" ("none" never builds one)
    named: str | None = None  # the function tool_choice names
    parallel_tool_calls: bool = True
    parser: str | None = None  # --tool-call-parser (auto)
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)  # function name -> its parameters schema


def check_tools(tools: Any) -> dict[str, dict[str, Any]]:
    """A non-empty `tools` list checked: each function's name -> its parameters schema, in the list's order."""
    if not isinstance(tools, list):
        raise bad("tools", f"must be a list of function tools, got {show(tools)}")
    schemas: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., "parameters": ...}}')
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise bad(f"tools[{i}].function.name", f"must be 1-64 letters, digits, _ or -, got {show(name)}")
        if name in schemas:
            raise bad(f"tools[{i}].function.name", f"{name!r} is given twice")
        params = fn.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise bad(f"tools[{i}].function.parameters", f"must be a JSON schema object, got {show(params)}")
        schemas[name] = params or {"type": "object"}
    return schemas


def template_tools(body: dict) -> list[dict[str, Any]] | None:
    """The tools the chat template shows the model: the request's, checked, whatever its tool_choice ("none"
    too, as vLLM's default: the model still knows them, it is only not asked to call one); /tokenize's too."""
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    check_tools(tools)
    return tools


def parse_tools(body: dict, enable_auto_tool_choice: bool, tool_call_parser: str | None) -> ToolsRequest | None:
    """The request's tools, or None when it has none or tool_choice is "none"; APIError naming the field."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad("parallel_tool_calls", f"must be true or false, got {show(parallel)}")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise bad("tool_choice", "needs `tools`")
        return None
    schemas = check_tools(tools)
    param = "tool_choice"
    if choice is None:  # OpenAI's default with tools
        choice, param = "auto", "tools"
    if choice == "none":
        return None
    named = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        named = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(named, str):
            raise bad("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                     '{"name": ...}}')
        if named not in schemas:
            raise bad("tool_choice.function.name", f"{named!r} is not one of the tools ({', '.join(schemas)})")
        choice = "named"
    elif choice not in ("auto", "required"):
        raise bad("tool_choice", f'must be "none", "auto", "required" or a named function, got {show(choice)}')
    if choice == "auto" and not (enable_auto_tool_choice and tool_call_parser):
        raise bad(param, 'tools with tool_choice "auto" (the default) need the server started with '
                         "--enable-auto-tool-choice and --tool-call-parser; or give tool_choice "
                         '"required" or a function')
    return ToolsRequest(tools, choice, named, True if parallel is None else parallel, tool_call_parser, schemas)


def required_schema(tr: ToolsRequest) -> dict[str, Any]:
    """`required`: a JSON array of calls, each {"name": one tool, "parameters": its schema} (as vLLM)."""
    calls = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": schema},
              "required": ["name", "parameters"]} for name, schema in tr.schemas.items()]
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not tr.parallel_tool_calls:
        array["maxItems"] = 1
    return array


def tool_constraint(tr: ToolsRequest) -> StructuredOutputsParams | None:
    """The structured output that enforces `required` or a named function; None for auto."""
    if tr.tool_choice == "auto":
        return None
    schema = required_schema(tr) if tr.tool_choice == "required" else tr.schemas[tr.named or ""]
    try:
        # compact: the arguments are re-serialized anyway, and a sampled run of whitespace only costs tokens
        return StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    except StructuredOutputsError as e:
        raise bad(_uncompilable_tool(tr), e.message) from None


def _uncompilable_tool(tr: ToolsRequest) -> str:
    """The field of the function whose parameters schema does not compile alone (the named one, else the
    first such); `tools` when only their `required` union fails. Only a refused request pays for this."""
    for i, (name, schema) in enumerate(tr.schemas.items()):  # in the order of `tools` (names are unique)
        if tr.named in (None, name):
            try:
                StructuredOutputsParams(json=schema, disable_any_whitespace=True)
            except StructuredOutputsError:
                return f"tools[{i}].function.parameters"
    return "tools"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def make_call(name: str, arguments: Any) -> dict[str, Any]:
    """One OpenAI tool call; arguments as a JSON string."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": text}}


def _calls_of(objs: Any, key: str = "arguments") -> list[dict[str, Any]] | None:
    """Calls from parsed JSON ({"name", key} objects, one or a list); None if it is not calls."""
    items = objs if isinstance(objs, list) else [objs]
    calls = []
    for obj in items:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
        calls.append(make_call(obj["name"], args))
    return calls


def calls_from_constrained(tr: ToolsRequest, text: str) -> list[dict[str, Any]]:
    """Calls from a `required` or named-function output (valid JSON unless cut by max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if tr.tool_choice == "named":
        return [make_call(tr.named or "", value)]
    return _calls_of(value, "parameters") or []


def parse_tool_calls(parser: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, calls) of a whole output; text that holds no well-formed call stays content."""
    if parser == "hermes":
        stream = HermesStream()
        content, calls = stream.feed(text)
        c2, more = stream.flush()
        return (content + c2).strip() or None, calls + more
    if parser == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        calls = []
        for part in (p for p in body.split(";") if p.strip()):
            try:
                parsed = _calls_of(json.loads(part), "parameters")
            except json.JSONDecodeError:
                parsed = None
            if parsed is None:  # any part that is not a call: the whole text is content
                return text, []
            calls += parsed
        return (text, []) if not calls else (None, calls)
    at = text.find("[TOOL_CALLS]")  # mistral
    if at < 0:
        return text, []
    try:
        calls = _calls_of(json.loads(text[at + len("[TOOL_CALLS]"):].strip()))
    except json.JSONDecodeError:
        return text, []
    return (text, []) if calls is None else (text[:at].strip() or None, calls)


class HermesStream:
    """Streamed hermes output: feed text deltas, get (content delta, calls completed by this delta)."""

    def __init__(self) -> None:
        self.held = ""  # possible start of <tool_call>, or the body of an open call
        self.in_call = False

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        text, self.held = self.held + delta, ""
        content, calls = "", []
        while text:
            if not self.in_call:
                at = text.find(HERMES_START)
                if at < 0:
                    keep = next((n for n in range(min(len(text), len(HERMES_START) - 1), 0, -1)
                                 if HERMES_START.startswith(text[-n:])), 0)
                    content += text[: len(text) - keep]
                    self.held = text[len(text) - keep:]
                    break
                content += text[:at]
                text, self.in_call = text[at + len(HERMES_START):], True
            else:
                end = text.find(HERMES_END)
                if end < 0:
                    self.held = text
                    break
                body, text, self.in_call = text[:end], text[end + len(HERMES_END):], False
                try:
                    parsed = _calls_of(json.loads(body))
                except json.JSONDecodeError:
                    parsed = None
                if parsed is None:  # not a call after all: the text stays content
                    content += HERMES_START + body + HERMES_END
                else:
                    calls += parsed
        return content, calls

    def flush(self) -> tuple[str, list[dict[str, Any]]]:
        """At the end: an unclosed call or a held partial tag is content."""
        held = (HERMES_START if self.in_call else "") + self.held
        self.held, self.in_call = "", False
        return held, []


def tool_message(tr: ToolsRequest, message: dict[str, Any], finish_reason: str | None) -> str | None:
    """Turn a chat response's message (content already split from reasoning) into its tool calls, in
    place; returns the finish reason ("tool_calls" when calls were made, as OpenAI, but for a named function or an
    answer cut by max_tokens: "length")."""
    text = message.get("content") or ""
    constrained = calls_from_constrained(tr, text) if tr.tool_choice != "auto" else []
    # a constrained answer that is not whole JSON was cut: by max_tokens, or by a stop string or token
    cut = finish_reason == "length" or (tr.tool_choice != "auto" and not constrained)
    if cut or (tr.tool_choice == "auto" and tr.parser == "hermes"):
        # what a stream sends, as it would report it: calls cut (max_tokens, a stop) as they stood; hermes calls as they
        # streamed (a call whose arguments turn out not to be JSON went out before that was known, as OpenAI's may)
        from engine.server.tool_stream import streamed_calls

        content, calls = streamed_calls(tr, text)
    elif tr.tool_choice == "auto":
        content, calls = parse_tool_calls(tr.parser or "hermes", text)
    else:
        content, calls = None, constrained
    if not calls:
        return finish_reason
    message["content"], message["tool_calls"] = content, calls if tr.parallel_tool_calls else calls[:1]
    return finish_reason if tr.tool_choice == "named" or finish_reason == "length" else "tool_calls"


def apply_tool_constraint(tr: ToolsRequest, params: Any) -> None:
    """`required` or a named function: constrain the request's SamplingParams (in place)."""
    constraint = tool_constraint(tr)
    if constraint is None:
        return
    if params.structured_outputs is not None:
        raise bad("tool_choice", "a required or named tool choice cannot be combined with response_format or "
                                 "structured_outputs")
    params.structured_outputs = constraint


def with_tool_fields(messages: list[dict[str, Any]], raw: list[Any]) -> list[dict[str, Any]]:
    """The parsed messages with the tool fields the chat template may read: an assistant's
    tool_calls (arguments parsed back to objects, as templates expect) and a tool message's tool_call_id."""
    out = []
    for i, (m, r) in enumerate(zip(messages, raw)):
        calls, call_id = r.get("tool_calls"), r.get("tool_call_id")
        if m["role"] == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise bad(f"messages[{i}].tool_calls", f"must be a list, got {show(calls)}")
            parsed = []
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad(f"messages[{i}].tool_calls[{j}]", "must have function.name and function.arguments")
                args, param = fn.get("arguments", "{}"), f"messages[{i}].tool_calls[{j}].function.arguments"
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except (ValueError, RecursionError):  # ValueError: also an integer past 4,300 digits
                    raise bad(param, "is not valid JSON (or nested too deeply, or a number too long)") from None
                check_depth(args, param)
                parsed.append({"id": call.get("id"), "type": "function",
                               "function": {"name": fn["name"], "arguments": args}})
            m = {**m, "tool_calls": parsed}
        if m["role"] == "tool" and call_id is not None:
            if not isinstance(call_id, str):
                raise bad(f"messages[{i}].tool_call_id", f"must be a string, got {show(call_id)}")
            m = {**m, "tool_call_id": call_id}
        out.append(m)
    return out
