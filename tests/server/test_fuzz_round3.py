"""A third round of hostile requests on the shared live server, features combined in one request: each test
pins a defect found that way (the request, then what vLLM or OpenAI would do). A tool call that a stop string
cut was a call streamed and plain text whole; beam search without max_tokens was refused naming max_tokens;
transformers' own options in chat_template_kwargs were refused naming `messages`."""
from __future__ import annotations

import json

import httpx
import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL, LiveServer

HI = [{"role": "user", "content": "Weather in Paris?"}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(autouse=True)
def _idle_after(server: LiveServer):
    yield
    m = server.wait_idle()
    assert m[("gantry:num_requests_running", ())] == 0 and m[("gantry:kv_cache_usage_perc", ())] == 0


def _answers(server: LiveServer, body: dict) -> tuple[tuple, tuple]:
    """(content, [(name, arguments)], finish_reason) of one greedy chat request, whole and streamed."""
    body = {"model": MODEL, "messages": HI, "max_tokens": 60, "temperature": 0.0, **body}
    r = httpx.post(server.url("/v1/chat/completions"), json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    message = choice["message"]
    whole = (message["content"] or "", [(c["function"]["name"], c["function"]["arguments"])
                                        for c in message.get("tool_calls") or []], choice["finish_reason"])
    content, calls, finish = "", {}, None
    with httpx.stream("POST", server.url("/v1/chat/completions"), json={**body, "stream": True}, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        for c in json.loads(event)["choices"]:
            content += c["delta"].get("content") or ""
            finish = c["finish_reason"] or finish
            for tc in c["delta"].get("tool_calls") or []:
                name, args = calls.get(tc["index"], ("", ""))
                calls[tc["index"]] = (name + (tc["function"].get("name") or ""), args + (tc["function"].get("arguments")
                                                                                          or ""))
    return whole, (content, [calls[i] for i in sorted(calls)], finish)


@pytest.mark.parametrize("tool_choice,stop", [
    ("required", {"stop": ["Par"]}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"stop": ["Par"]}),
    ("required", {"stop": ["}"], "include_stop_str_in_output": True}),
])
def test_a_tool_call_cut_by_a_stop_string_agrees_streamed_and_not(server: LiveServer, tool_choice, stop: dict) -> None:
    """tool_choice required, its JSON cut by a stop string: the stream sent the call begun (as for a cut by
    max_tokens), while the whole answer gave its raw JSON as content, with no call."""
    whole, streamed = _answers(server, {"tools": WEATHER, "tool_choice": tool_choice, **stop})
    assert whole == streamed
    assert whole[0] == "" and [name for name, _ in whole[1]] == ["get_weather"], whole


def test_beam_search_without_max_tokens_takes_what_the_context_leaves(server: LiveServer) -> None:
    """The generation config's max_new_tokens (256) was given to a beam search as if the client had sent
    max_tokens 256, past max_model_len (128): a 400 naming max_tokens, which the client never sent. Sampling
    and vLLM take at most what the context leaves."""
    prompt = "word " * 120
    r = httpx.post(server.url("/v1/completions"), json={"model": MODEL, "prompt": prompt, "use_beam_search": True,
                                                        "best_of": 2, "ignore_eos": True}, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["total_tokens"] == MAX_MODEL_LEN, usage
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = httpx.post(server.url("/v1/completions"), json={"model": MODEL, "prompt": prompt, "use_beam_search": True,
                                                        "best_of": 2, "max_tokens": 10}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # one the client sent: refused


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
@pytest.mark.parametrize("key,value", [("documents", 5), ("documents", [{"title": "t", "text": "x"}]),
                                       ("sanitize_control_tokens", True), ("self", 1)])
def test_renderer_options_in_chat_template_kwargs_name_the_key(server: LiveServer, path: str, key: str,
                                                               value) -> None:
    """transformers' own arguments of apply_chat_template, not template variables: refused as 'the chat
    template rejected the messages' (param `messages`), or documents taken while chat's own field is refused."""
    r = httpx.post(server.url(path), json={"model": MODEL, "messages": HI, "max_tokens": 2,
                                           "chat_template_kwargs": {key: value}}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == f"chat_template_kwargs.{key}", r.text
