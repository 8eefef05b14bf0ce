"""Tool calling through the openai client (issue 16) on a SmolLM2 server started with
--enable-auto-tool-choice --tool-call-parser hermes: `required` and a named function give valid
tool_calls (stream and not), a `tool` message goes back in for the answer, and `auto` turns a
<tool_call>...</tool_call> output (forced here with a regex) into tool_calls. Streamed, a call's first delta
carries its id, type, name and arguments "", its arguments follow in fragments, and the openai client's
accumulation (ChatCompletionStreamState) equals the non-streamed answer."""
from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.server.conftest import MODEL, LiveServer, launch, wait_ready

PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_REGEX = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}</tool_call>'


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    server = wait_ready(launch(tmp_path_factory.mktemp("tools"), "--enable-auto-tool-choice",
                               "--tool-call-parser", "hermes", "--max-model-len", "512"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tool_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.url("/v1"), api_key="unused", max_retries=0)


def check_calls(calls: list, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
        if call.function.name == "get_weather":
            jsonschema.validate(json.loads(call.function.arguments), PARAMS)


def streamed_calls(stream) -> tuple[dict[int, dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    return calls, finish


def test_required_round_trip(client: openai.OpenAI) -> None:
    # seeded: `required` is an array of calls with no bound (as vLLM's), and at temperature 1 about one
    # sample in a hundred keeps calling past 100 tokens; a seed makes the sample the same on every run
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=100, temperature=1.0, seed=1)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls, {"get_weather", "get_time"})
    call = choice.message.tool_calls[0]
    answer = client.chat.completions.create(model=MODEL, max_tokens=16, tools=TOOLS, tool_choice="none", messages=[
        *ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'}])
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    calls, finish = streamed_calls(client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=100, seed=2, stream=True))
    assert finish == "tool_calls" and calls and all(c["name"] in ("get_weather", "get_time") for c in calls.values())


def test_named_function_stream_and_not(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    # 96 tokens: {"city": ...} with 12 characters that may each be a six-byte escape is 84 tokens at worst
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=96,
                                       temperature=1.0, n=2)
    for choice in r.choices:
        check_calls(choice.message.tool_calls, {"get_weather"})
    calls, _ = streamed_calls(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                             tool_choice=named, max_tokens=96, stream=True))
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMS)


def test_auto_hermes_output_becomes_tool_calls(client: openai.OpenAI) -> None:
    extra = {"structured_outputs": {"regex": HERMES_REGEX}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=100, extra_body=extra)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    check_calls(r.choices[0].message.tool_calls, {"get_weather"})
    calls, finish = streamed_calls(client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                                  max_tokens=100, extra_body=extra, stream=True))
    assert finish == "tool_calls" and json.loads(calls[0]["arguments"])["city"] in ("Paris", "Rome")


@pytest.mark.parametrize("tool_choice,extra", [
    ("required", None),
    ({"type": "function", "function": {"name": "get_weather"}}, None),
    ("auto", {"structured_outputs": {"regex": HERMES_REGEX}}),
])
def test_streamed_calls_accumulate_to_the_whole_answer(client: openai.OpenAI, tool_choice, extra) -> None:
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 100,
              "temperature": 0.0, "extra_body": extra}
    whole = client.chat.completions.create(**kwargs).choices[0]
    state, first, fragments = ChatCompletionStreamState(input_tools=TOOLS), {}, {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        state.handle_chunk(chunk)
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                if tc.index not in first:  # a call's first delta: all of its header, no arguments yet
                    first[tc.index] = tc
                    assert tc.id and tc.type == "function" and tc.function.name and tc.function.arguments == ""
                else:
                    assert tc.id is None and tc.function.name is None
                    fragments[tc.index] = fragments.get(tc.index, 0) + 1
    streamed = state.get_final_completion().choices[0]
    assert whole.message.tool_calls and streamed.finish_reason == whole.finish_reason
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(fragments[i] > 1 for i in first)  # the arguments came while they were written


@pytest.mark.parametrize("tool_choice,max_tokens", [
    ("required", 20),  # a first call whole, the second cut
    ({"type": "function", "function": {"name": "get_weather"}}, 6),  # the arguments cut
])
def test_an_answer_cut_by_max_tokens_agrees_streamed_and_not(client: openai.OpenAI, tool_choice, max_tokens) -> None:
    """Cut by max_tokens, both report finish_reason "length" and the same calls, the last one's arguments cut
    as OpenAI returns them. Before, the plain answer gave the raw text as content and the stream gave calls with
    "tool_calls" (found by fuzzing the API)."""
    kwargs = {"model": MODEL, "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": max_tokens,
              "temperature": 0.0}
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls, finish = streamed_calls(client.chat.completions.create(stream=True, **kwargs))
    assert whole.finish_reason == finish == "length"
    assert whole.message.tool_calls and all(c.id.startswith("call_") for c in whole.message.tool_calls)
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]


def test_bad_tool_choice_is_400(tool_server: LiveServer, server: LiveServer) -> None:
    body = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 4,
            "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    r = httpx.post(tool_server.url("/v1/chat/completions"), json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice.function.name"
    r = httpx.post(server.url("/v1/chat/completions"), json={**body, "tool_choice": "auto"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"  # no --enable-auto-tool-choice
