"""A hostile but realistic client of /v1/chat/completions and /v1/completions, on the shared live
server: each test pins a defect that was found by hand (the request, then what the server should do),
in vLLM's or OpenAI's behaviour: text parts joined with newlines, `name` kept, a `refusal` part read,
max_tokens checked beside max_completion_tokens, `user` a string, stream_options.continuous_usage_stats
honoured, logprobs `bytes` that join back into the text when a token is half a character; with tools,
parallel_tool_calls=false honoured and streamed content equal to the whole answer's around calls; /tokenize
templating messages as chat does; JSON nested too deep refused with a 400."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL, LiveServer
from tests.server.test_tools_server import tool_server  # noqa: F401 (the auto tool-choice server, for this module)

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)


def tokenize_chat(server: LiveServer, messages: list) -> list[int]:
    r = httpx.post(server.url("/tokenize"), json={"model": MODEL, "messages": messages}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def chat(server: LiveServer, **body) -> httpx.Response:
    return httpx.post(server.url("/v1/chat/completions"), json={"model": MODEL, "messages": HI, "max_tokens": 2,
                                                                **body}, timeout=60)


def sse_events(server: LiveServer, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", server.url(path), json={"model": MODEL, **body}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_text_parts_are_joined_with_newlines(server: LiveServer) -> None:
    """[{text: Hello}, {text: world}] was templated as "Helloworld"; vLLM joins parts with "\\n"."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    assert tokenize_chat(server, parts) == tokenize_chat(server, [{"role": "user", "content": "Hello\nworld"}])


def test_an_image_part_is_a_400_naming_the_part(server: LiveServer) -> None:
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    r = chat(server, messages=[{"role": "user", "content": content}])
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages[0].content[1]" and "image_url" in err["message"]


def test_an_assistant_refusal_part_is_its_text(server: LiveServer, client: openai.OpenAI) -> None:
    """An assistant message replayed with OpenAI's `refusal` part was a 400; vLLM reads it as text."""
    refused = [*HI, {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
               {"role": "user", "content": "Why?"}]
    as_text = [*HI, {"role": "assistant", "content": "I cannot."}, {"role": "user", "content": "Why?"}]
    assert tokenize_chat(server, refused) == tokenize_chat(server, as_text)
    assert client.chat.completions.create(model=MODEL, messages=refused, max_tokens=2).choices[0].message
    r = chat(server, messages=[{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0]"  # the assistant's only


def test_a_message_name_is_accepted_and_checked(server: LiveServer, client: openai.OpenAI) -> None:
    named = [{"role": "user", "name": "bob", "content": "Hi"}]
    assert client.chat.completions.create(model=MODEL, messages=named, max_tokens=2).choices[0].finish_reason
    r = chat(server, messages=[{"role": "user", "name": 5, "content": "Hi"}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].name"


def test_max_tokens_is_checked_beside_max_completion_tokens(server: LiveServer) -> None:
    """max_tokens=-5 passed unread when max_completion_tokens was given, and a too large
    max_completion_tokens was blamed on max_tokens (by the parser, and by the engine's context check)."""
    r = chat(server, max_tokens=-5, max_completion_tokens=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = chat(server, max_tokens=None, max_completion_tokens=10**6)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    for stream in (False, True):  # fits max_model_len alone, not after the prompt: the engine's refusal
        r = chat(server, max_tokens=None, max_completion_tokens=MAX_MODEL_LEN - 1, stream=stream)
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "max_completion_tokens", err
        assert "max_completion_tokens" in err["message"] and "max_tokens " not in err["message"]
    r = chat(server, max_tokens=50, max_completion_tokens=2)  # both valid: max_completion_tokens wins, as vLLM
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "Hi"})])
def test_user_must_be_a_string(server: LiveServer, path: str, body: dict) -> None:
    r = httpx.post(server.url(path), json={"model": MODEL, "max_tokens": 2, "user": 5, **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "user"
    r = httpx.post(server.url(path), json={"model": MODEL, "max_tokens": 2, "user": "u-1", "metadata": {"k": "v"},
                                           "store": False, **body}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", {"messages": HI, "n": 2}),
                                       ("/v1/completions", {"prompt": ["Hi", "Hello"]})])
def test_continuous_usage_stats_puts_usage_in_every_chunk(server: LiveServer, path: str, body: dict) -> None:
    """stream_options.continuous_usage_stats (vLLM) was ignored: only the last chunk had usage."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    events = sse_events(server, path, {**body, "max_tokens": 4, "ignore_eos": True, "stream": True,
                                       "stream_options": opts})
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 8
    seen: dict[int, int] = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        usage = chunk["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 0
        assert usage["completion_tokens"] >= seen.get(choice["index"], 0)
        seen[choice["index"]] = usage["completion_tokens"]
    assert seen == {0: 4, 1: 4}
    # without include_usage it asks for nothing, as in vLLM
    events = sse_events(server, path, {**body, "max_tokens": 2, "stream": True,
                                       "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in e or e["usage"] is None for e in events)
    r = httpx.post(server.url(path), json={"model": MODEL, **body, "max_tokens": 2, "stream": True,
                                           "stream_options": {"continuous_usage_stats": "yes"}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.continuous_usage_stats"


@pytest.mark.parametrize("stream", [False, True])
def test_logprob_bytes_of_split_characters_join_into_the_text(client: openai.OpenAI, stream: bool) -> None:
    """An emoji or CJK character split over tokens: each token's text is U+FFFD, and `bytes` were
    U+FFFD's (EF BF BD), so joining them gave mojibake; OpenAI's `bytes` are the token's own."""
    text = "😀你好🎉 é"
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=20, logprobs=True, top_logprobs=2,
                                       stream=stream, extra_body={"structured_outputs": {"regex": text}})
    if stream:
        tokens = [t for chunk in r if chunk.choices and chunk.choices[0].logprobs
                  for t in chunk.choices[0].logprobs.content]
    else:
        tokens = r.choices[0].logprobs.content
    assert any(t.token == "\ufffd" for t in tokens)  # the case under test: a token that is part of a character
    joined = b"".join(bytes(t.bytes) for t in tokens).decode("utf-8")
    assert joined.startswith(text)  # then only the end-of-turn token


def test_tokenize_counts_the_prompt_chat_would_run(server: LiveServer) -> None:
    """/tokenize ignored continue_final_message: it counted a closed assistant message (34 tokens here) where
    the chat request runs an open one (32)."""
    messages = [*HI, {"role": "assistant", "content": "Sure"}]
    opened = {"continue_final_message": True, "add_generation_prompt": False}
    r = httpx.post(server.url("/tokenize"), json={"model": MODEL, "messages": messages, **opened}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["count"] == chat(server, messages=messages, **opened).json()["usage"]["prompt_tokens"]
    assert r.json()["count"] < len(tokenize_chat(server, messages))
    r = httpx.post(server.url("/tokenize"), json={"model": MODEL, "messages": messages,
                                                  "continue_final_message": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def nested_schema(levels: int) -> dict:
    """An object schema with `levels` objects inside one another (2 JSON levels each)."""
    schema: dict = {"type": "object"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_deep_json_is_a_400_not_a_500(server: LiveServer) -> None:
    """A response_format schema nested 400 objects deep (800 JSON levels, 18 KB) parsed, then failed to pickle
    to the text worker: a 500; a history tool call's arguments "[[[[..." hit the JSON decoder's recursion: a 500."""
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested_schema(400)}}
    r = chat(server, response_format=fmt)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body", r.text
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested_schema(50)}}
    assert chat(server, response_format=fmt).status_code == 200  # deep, but within MAX_JSON_DEPTH
    for arguments in ("[" * 5000, json.dumps(nested_schema(100))):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        r = chat(server, messages=[*HI, {"role": "assistant", "tool_calls": [call]}])
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


# ---- tools, on a server with --enable-auto-tool-choice --tool-call-parser hermes ----

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}]
TWO_CALLS = (r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris"\}\}</tool_call>\n'
             r'<tool_call>\{"name": "get_time", "arguments": \{"tz": "UTC"\}\}</tool_call>\n')


def tool_answers(tool_server: LiveServer, regex: str, **kwargs) -> tuple[tuple, tuple]:
    """(content, [(name, arguments)], finish_reason) of the same forced answer, not streamed and streamed."""
    tool_client = openai.OpenAI(base_url=tool_server.url("/v1"), api_key="unused", max_retries=0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris, time in UTC?"}],
            "tools": TOOLS, "max_tokens": 120, "temperature": 0.0,  # greedy: the same tokens (a regex can be
            "extra_body": {"structured_outputs": {"regex": regex}}, **kwargs}  # written in several splits)
    choice = tool_client.chat.completions.create(**body).choices[0]
    whole = (choice.message.content or "", [(c.function.name, c.function.arguments)
                                            for c in choice.message.tool_calls or []], choice.finish_reason)
    content, calls, finish = "", {}, None
    for chunk in tool_client.chat.completions.create(**body, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            finish = c.finish_reason or finish
            for tc in c.delta.tool_calls or []:
                name, args = calls.get(tc.index, ("", ""))
                calls[tc.index] = (name + (tc.function.name or ""), args + (tc.function.arguments or ""))
    return whole, (content, [calls[i] for i in sorted(calls)], finish)


@pytest.mark.parametrize("parallel", [True, False])
def test_parallel_tool_calls_false_returns_one_call(tool_server: LiveServer, parallel: bool) -> None:
    """With tool_choice auto, parallel_tool_calls=false still returned every call the model wrote; vLLM (PR 26233)
    and OpenAI return at most one."""
    whole, streamed = tool_answers(tool_server, TWO_CALLS, parallel_tool_calls=parallel)
    calls = [("get_weather", '{"city": "Paris"}'), ("get_time", '{"tz": "UTC"}')]
    assert whole == streamed == ("", calls if parallel else calls[:1], "tool_calls")


@pytest.mark.parametrize("regex,content", [(TWO_CALLS, ""), ("Sure! " + TWO_CALLS, "Sure!"),
                                           (TWO_CALLS + " done", "done"), (r"\n\nHi  \n", "\n\nHi  \n")])
def test_whitespace_between_calls_is_not_streamed_as_content(tool_server: LiveServer, regex: str,
                                                             content: str) -> None:
    """The newline between two hermes calls (and after the last, or before text after them) went out as streamed
    content, while the whole answer's content is stripped; an answer without calls keeps its whitespace both ways."""
    whole, streamed = tool_answers(tool_server, regex)
    assert whole == streamed and whole[0] == content


@pytest.mark.parametrize("max_tokens", [12, 40])  # greedy, cut: before the first call's arguments; in its end tag
def test_an_auto_answer_cut_by_max_tokens_agrees_streamed_and_not(tool_server: LiveServer, max_tokens: int) -> None:
    """hermes, cut inside a call: the stream had sent the call begun (its arguments cut) while the plain answer
    gave that call's text as content; now both give the stream's view, as required and named answers do."""
    whole, streamed = tool_answers(tool_server, TWO_CALLS, max_tokens=max_tokens)
    assert whole == streamed and whole[2] == "length"


def test_a_hermes_call_with_arguments_that_are_not_json_agrees_streamed_and_not(tool_server: LiveServer) -> None:
    """The stream sends a call as soon as its name and arguments begin, so a call whose arguments turn out not to
    be JSON has gone out; the plain answer gave the whole text as content instead (tool_calls: none)."""
    regex = r'Sure! <tool_call>\{"name": "get_weather", "arguments": \{"city": Paris\}\}</tool_call> done'
    whole, streamed = tool_answers(tool_server, regex)
    assert whole == streamed == ("Sure!  done", [("get_weather", '{"city": Paris}')], "tool_calls")


HERMES_ANSWERS = [  # regexes the model is held to: calls in odd shapes, text around them, cut tags
    r'Ok\. <tool_call>\{"name": "get_time", "arguments": \{"tz": "UTC"\}\}</tool_call>\n'
    r'<tool_call>\{"name": "get_weather", "arguments": \{\}\}</tool_call>',
    r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "😀你"\}\}</tool_call> done',
    r'<tool_call>\[\{"name": "get_time", "arguments": \{"tz": "CET"\}\}, \{"name": "get_weather", "parameters": '
    r'\{"city": "x"\}\}\]</tool_call>',
    r'<tool_call>\{"name": "get_weather", "arguments": "\{\\"city\\": \\"Oslo\\"\}"\}</tool_call>',
    r'no tools here <tool_ca',
]


@pytest.mark.parametrize("max_tokens", [15, 120])
@pytest.mark.parametrize("regex", HERMES_ANSWERS)
def test_hermes_answers_agree_streamed_and_not(tool_server: LiveServer, regex: str, max_tokens: int) -> None:
    whole, streamed = tool_answers(tool_server, regex, max_tokens=max_tokens)
    assert whole == streamed
