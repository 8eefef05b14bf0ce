"""Tool-call parsers and tools validation (issue 16) on fixed texts: hermes, llama3_json and mistral
outputs become tool_calls; hermes streamed at every split into two or three pieces gives the same
calls and content as the whole text, each call's first delta its id, type, name and arguments "", its
arguments in fragments after it (required and named too); bad tools / tool_choice are 400s naming the field."""
from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from engine.config import ConfigError, ServerConfig
from engine.server.protocol import APIError, ModelContext
from engine.server.text import prepare_chat
from engine.server.text import tokenize as text_tokenize
from engine.server.tool_stream import CanonicalJSON, ToolDeltas
from engine.server.tools import (
    ToolsRequest,
    parse_tool_calls,
    parse_tools,
    tool_constraint,
    tool_message,
)

HERMES = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>')
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time"}}]


def names_args(calls: list[dict]) -> list[tuple[str, dict]]:
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("parser,text,content,calls", [
    ("hermes", HERMES, "Let me look.", CALLS),
    ("hermes", "no call here <tool_", "no call here <tool_", []),
    ("hermes", "<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None, CALLS[:1]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
                    '"parameters": {"tz": "CET"}}', None, CALLS),
    ("llama3_json", "Paris is nice.", "Paris is nice.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, CALLS[:1]),
    ("mistral", "Just text.", "Just text.", []),
])
def test_parsers_on_fixed_texts(parser: str, text: str, content: str | None, calls: list) -> None:
    got_content, got_calls = parse_tool_calls(parser, text)
    assert got_content == content and names_args(got_calls) == calls


def accumulate(calls: list[dict], entries: list[dict]) -> None:
    """The openai client's accumulation of tool_calls deltas: by index, strings joined."""
    for e in entries:
        if e["index"] == len(calls):  # a call's first delta: all of its header, no arguments yet
            assert e["id"].startswith("call_") and e["type"] == "function" and e["function"]["arguments"] == ""
            calls.append({"id": e["id"], "type": "function", "function": dict(e["function"]), "fragments": 0})
        else:
            assert set(e) == {"index", "function"} and set(e["function"]) == {"arguments"}
            assert e["function"]["arguments"]
            calls[e["index"]]["function"]["arguments"] += e["function"]["arguments"]
            calls[e["index"]]["fragments"] += 1


def _stream(tr: ToolsRequest, pieces: list[str]) -> tuple[str, list[dict], str | None]:
    deltas, content, calls, finish = ToolDeltas(tr), "", [], None
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        d = deltas.delta(0, {"content": piece} if piece else {}, last)
        content += d.get("content", "")
        accumulate(calls, d.get("tool_calls", []))
        finish = deltas.finish_reason(0, "stop" if last else None)
    return content, calls, finish


def whole(tr: ToolsRequest, text: str) -> tuple[str | None, list[tuple[str, str]], str | None]:
    """The non-streamed answer: content, (name, arguments text) per call, finish reason."""
    message = {"content": text}
    finish = tool_message(tr, message, "stop")
    return message["content"], [(c["function"]["name"], c["function"]["arguments"])
                                for c in message.get("tool_calls", [])], finish


@pytest.mark.parametrize("text", [
    '{"city": "Paris"}', '{ "a" : [1, 2.50, -0, 1e3, true, null, {}, [ ]], "b": {"c": "x\\"y"} }',
    '{"s": "caf\\u00e9 \\ud83d\\ude00 \\n\\/ é"}', '[ ]', '"a string"', '12', '{"k":{"l":[{"m":false}]}}',
])
def test_canonical_json_is_json_dumps_char_by_char(text: str) -> None:
    c, out = CanonicalJSON(), ""
    for ch in text:
        piece, consumed = c.feed(ch)
        out += piece
        assert consumed
    out += "" if c.done else c.finish()
    assert c.done and out == json.dumps(json.loads(text), ensure_ascii=False)


def test_hermes_stream_split_at_every_boundary() -> None:
    tr = ToolsRequest(TOOLS, "auto", parser="hermes")
    n = len(HERMES)
    cuts = [[i] for i in range(1, n)] + [list(c) for c in itertools.combinations(range(1, n, 3), 2)]
    for cut in cuts:
        bounds = [0, *cut, n]
        content, calls, finish = _stream(tr, [HERMES[a:b] for a, b in zip(bounds, bounds[1:])])
        assert content.strip() == "Let me look." and names_args(calls) == CALLS and finish == "tool_calls"
    _, expected, _ = whole(tr, HERMES)
    content, calls, _ = _stream(tr, list(HERMES))  # a character a token: the arguments come as they are written
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == expected
    assert all(c["fragments"] > 5 for c in calls)


@pytest.mark.parametrize("choice,text", [
    ("named", '{"city":"Rome"}'),
    ("named", '{"city": "Ro\\u006de", "n": 1.50}'),
    ("required", '[{"name":"get_weather","parameters":{"city":"Paris"}},'
                 '{"name":"get_time","parameters":{"tz":"CET"}}]'),
    ("required", '[ {"name": "get_time", "parameters": {}} ]'),
])
def test_constrained_calls_streamed_equal_the_whole_answer(choice: str, text: str) -> None:
    body = {"tools": TOOLS, "tool_choice": choice if choice == "required" else
            {"type": "function", "function": {"name": "get_weather"}}}
    tr = parse_tools(body, False, None)
    content, expected, finish = whole(tr, text)
    assert expected and content is None
    n = len(text)
    for cut in [[i] for i in range(1, n)] + [list(range(1, n))]:
        bounds = [0, *cut, n]
        got_content, calls, got_finish = _stream(tr, [text[a:b] for a, b in zip(bounds, bounds[1:])])
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == expected
        assert not got_content and got_finish == finish


@pytest.mark.parametrize("text", ["<tool_call>not json</tool_call> ok", "<tool_call>{1: 2}</tool_call>",
                                  '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>[3, {]</tool_call>",
                                  '<tool_call>{"name": "get_time"'])
def test_hermes_text_that_is_no_call_streams_back_as_content(text: str) -> None:
    tr = ToolsRequest(TOOLS, "auto", parser="hermes")
    assert parse_tool_calls("hermes", text) == (text, [])
    for cut in range(1, len(text)):
        assert _stream(tr, [text[:cut], text[cut:]]) == (text, [], "stop")


def test_named_call_waits_for_content() -> None:
    """Deltas without content (a reasoning model's thinking) open no call."""
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                        False, None)
    deltas = ToolDeltas(named)
    assert deltas.delta(0, {"reasoning_content": "hm"}, False) == {"reasoning_content": "hm"}
    assert deltas.delta(0, {}, True) == {} and deltas.finish_reason(0, "length") == "length"


def test_constrained_output_cut_before_a_call_is_content() -> None:
    tr = parse_tools({"tools": TOOLS, "tool_choice": "required"}, False, None)
    assert _stream(tr, ['[{"na', 'me": "get_w']) == ('[{"name": "get_w', [], "stop")
    assert whole(tr, '[{"name": "get_w') == ('[{"name": "get_w', [], "stop")


def test_llama3_json_streams_its_calls_at_the_end() -> None:
    tr = ToolsRequest(TOOLS, "auto", parser="llama3_json")
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    content, calls, finish = _stream(tr, [text[:10], text[10:]])
    assert not content and names_args(calls) == CALLS[:1] and finish == "tool_calls"


def test_required_and_named_constraints() -> None:
    body = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    tr = parse_tools(body, False, None)
    schema = json.loads(tool_constraint(tr).json)  # a schema is kept as its JSON text once checked
    assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"] == {"enum": ["get_weather"]}
    named = parse_tools({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
                        False, None)
    assert named.named == "get_weather" and json.loads(tool_constraint(named).json) == TOOLS[0]["function"]["parameters"]
    content, calls, finish = _stream(named, ['{"city": ', '"Rome"}'])
    assert names_args(calls) == [("get_weather", {"city": "Rome"})] and finish == "stop" and not content
    assert parse_tools({"tools": TOOLS, "tool_choice": "none"}, False, None) is None


@pytest.mark.parametrize("body,auto,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, True,
     "tool_choice.function.name"),
    ({"tools": TOOLS}, False, "tools"),  # auto (the default) without --enable-auto-tool-choice
    ({"tools": TOOLS, "tool_choice": "auto"}, False, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, True, "tool_choice"),
    ({"tool_choice": "required"}, True, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, True, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, True, "tools[0]"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, True, "parallel_tool_calls"),
])
def test_bad_tools_name_the_field(body: dict, auto: bool, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_tools(body, auto, "hermes" if auto else None)
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "broken"}}])
def test_an_uncompilable_parameters_schema_is_named(choice: Any) -> None:
    """The 400 names the function whose schema fails (it named `tools` and said "cannot be compiled" twice)."""
    broken = {"type": "function", "function": {"name": "broken", "parameters": {"type": "bogus"}}}
    tr = parse_tools({"tools": [*TOOLS, broken], "tool_choice": choice}, False, None)
    with pytest.raises(APIError) as info:
        tool_constraint(tr)
    assert info.value.param == f"tools[{len(TOOLS)}].function.parameters"
    assert info.value.message.count("cannot be compiled") == 1 and "bogus" in info.value.message


class TemplateSpy:
    """A tokenizer whose chat template records the tools it was given."""
    chat_template = "spy"

    def __init__(self) -> None:
        self.tools: list = []

    def apply_chat_template(self, messages: list, chat_template: Any = None, tokenize: bool = False, **options) -> str:
        self.tools.append(options["tools"])
        return "x" * len(messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [1] * len(text)


@pytest.mark.parametrize("choice", ["none", "required", {"type": "function", "function": {"name": "get_weather"}}])
def test_the_chat_template_sees_the_tools_whatever_the_tool_choice(choice: Any) -> None:
    """tool_choice "none" keeps the tools in the prompt, as vLLM does by default (they were dropped), and
    /tokenize templates a request's tools as chat does (they were ignored)."""
    ctx = ModelContext("m", max_model_len=64, vocab_size=100)
    spy = TemplateSpy()
    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, "tool_choice": choice}
    prepare_chat(json.dumps(body).encode(), ctx, spy)
    del body["tool_choice"]
    assert text_tokenize(json.dumps(body).encode(), ctx, spy) == ([1], None)
    assert spy.tools == [TOOLS, TOOLS]
    with pytest.raises(APIError) as info:  # checked as chat checks them
        text_tokenize(json.dumps({**body, "tools": [{"type": "retrieval"}]}).encode(), ctx, spy)
    assert info.value.param == "tools[0]"


def test_parser_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig(tool_call_parser="xml")
    assert info.value.param == "tool_call_parser"
    with pytest.raises(ConfigError) as info:
        ServerConfig(enable_auto_tool_choice=True)
    assert info.value.param == "tool_call_parser"
