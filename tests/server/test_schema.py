"""Real responses of a live server validate against OpenAI's published response schemas
(fixtures/openai_schemas.yaml): models (list and retrieve), completions (plain, echo with
logprobs, stream), chat (plain, n, logprobs, stream chunks with and without usage) and errors.
Also what those responses carry: echoed prompt logprobs, and streams that stop inside a character."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import yaml

from tests.server.conftest import MODEL, LiveServer

SCHEMA_PATH = Path(__file__).parent / "fixtures" / "openai_schemas.yaml"
REPLACEMENT_CHAR = "\ufffd"
# Greedy SmolLM2 continues these in Chinese; found by trying: the first token and the last one
# allowed end inside a character (the tests check that they still do).
CUT_PROMPT, CUT_MAX_TOKENS = "你好，", 3
CUT_MESSAGES, CUT_CHAT_MAX_TOKENS = [{"role": "user", "content": "用中文回答：你好吗？"}], 3


# ---- the schema document -> JSON Schema validators ----

def to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (which the document still uses in places, even beside a
    $ref) as JSON Schema: anyOf the schema and null. 3.1's type lists and anyOf null pass as they are."""
    if isinstance(node, list):
        return [to_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


def load_schemas() -> dict[str, Any]:
    return to_json_schema(yaml.safe_load(SCHEMA_PATH.read_text(encoding="utf-8")))


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def with_openai_behaviour(doc: dict[str, Any]) -> dict[str, Any]:
    """Two places where OpenAI's own API (and vLLM) answer outside the document, as clients expect:
    - a completion stream chunk has finish_reason null until its choice ends (the document uses
      the whole-response schema for chunks);
    - echo with logprobs gives the first prompt token, which nothing predicts, null in
      token_logprobs and top_logprobs."""
    doc = copy.deepcopy(doc)
    schemas = doc["components"]["schemas"]
    chunk = copy.deepcopy(schemas["CreateCompletionResponse"])
    choice = chunk["properties"]["choices"]["items"]["properties"]
    choice["finish_reason"] = nullable(choice["finish_reason"])
    schemas["CompletionStreamChunk"] = chunk
    for name in ("CreateCompletionResponse", "CompletionStreamChunk"):
        logprobs = schemas[name]["properties"]["choices"]["items"]["properties"]["logprobs"]["anyOf"][0]
        for field in ("token_logprobs", "top_logprobs"):
            logprobs["properties"][field]["items"] = nullable(logprobs["properties"][field]["items"])
    return doc


@pytest.fixture(scope="module")
def schema_doc() -> dict[str, Any]:
    return with_openai_behaviour(load_schemas())


def validate(doc: dict[str, Any], component: str, instance: Any) -> None:
    schema = {**doc, "$ref": f"#/components/schemas/{component}"}
    jsonschema.Draft202012Validator(schema).validate(instance)


def test_validation_catches_the_known_gaps(schema_doc: dict[str, Any]) -> None:
    """The validator can fail: fee3d79's chat response (no refusal, null system_fingerprint)."""
    old = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": MODEL,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "logprobs": None,
                        "finish_reason": "stop"}],
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    with pytest.raises(jsonschema.ValidationError, match="refusal"):
        validate(schema_doc, "CreateChatCompletionResponse", old)
    old["choices"][0]["message"]["refusal"] = None
    validate(schema_doc, "CreateChatCompletionResponse", old)
    with pytest.raises(jsonschema.ValidationError, match="None is not of type 'string'"):
        validate(schema_doc, "CreateChatCompletionResponse", {**old, "system_fingerprint": None})
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "usage": None,
             "choices": [{"index": 0, "delta": {}, "finish_reason": None, "logprobs": {"content": []}}]}
    with pytest.raises(jsonschema.ValidationError, match="refusal"):  # 3.0 nullable turned into JSON Schema
        validate(schema_doc, "CreateChatCompletionStreamResponse", chunk)
    chunk["choices"][0]["logprobs"] = None
    validate(schema_doc, "CreateChatCompletionStreamResponse", chunk)


# ---- a live server's raw JSON ----

def post(server: LiveServer, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    r = httpx.post(server.url(path), json=body, headers=server.headers, timeout=120)
    assert r.status_code == status, r.text
    return r.json()


def stream(server: LiveServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The SSE events of a stream, parsed; the stream must end with [DONE]."""
    events = []
    with httpx.stream("POST", server.url(path), json={**body, "stream": True}, headers=server.headers,
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events and events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_models_list_and_retrieve(server: LiveServer, schema_doc: dict[str, Any]) -> None:
    listed = httpx.get(server.url("/v1/models"), headers=server.headers, timeout=30).json()
    validate(schema_doc, "ListModelsResponse", listed)
    r = httpx.get(server.url(f"/v1/models/{MODEL}"), headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    validate(schema_doc, "Model", r.json())
    assert r.json() == listed["data"][0]
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="na", max_retries=0, timeout=60)
    assert client.models.retrieve(MODEL).id == MODEL
    for unknown in ("gpt-4o", "org/some-model"):  # an id with a slash too: the model, not the route, is missing
        r = httpx.get(server.url(f"/v1/models/{unknown}"), headers=server.headers, timeout=30)
        assert r.status_code == 404, r.text
        validate(schema_doc, "ErrorResponse", r.json())
        assert r.json()["error"]["param"] == "model" and r.json()["error"]["code"] == "model_not_found"
        assert unknown in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_completions(server: LiveServer, schema_doc: dict[str, Any]) -> None:
    base = {"model": MODEL, "max_tokens": 4, "temperature": 0}
    validate(schema_doc, "CreateCompletionResponse",
             post(server, "/v1/completions", {**base, "prompt": ["Hello", "The sky is"], "n": 2}))
    body = post(server, "/v1/completions", {**base, "prompt": "Once upon a time", "echo": True, "logprobs": 2})
    validate(schema_doc, "CreateCompletionResponse", body)
    chunks = stream(server, "/v1/completions", {**base, "prompt": "1, 2, 3,", "logprobs": 1, "echo": True,
                                                "stream_options": {"include_usage": True}})
    for c in chunks:
        validate(schema_doc, "CompletionStreamChunk", c)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all("usage" not in c for c in chunks[:-1])
    for c in stream(server, "/v1/completions", {**base, "prompt": ["a", "b"], "n": 2}):
        validate(schema_doc, "CompletionStreamChunk", c)


def test_chat(server: LiveServer, schema_doc: dict[str, Any]) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}
    plain = post(server, "/v1/chat/completions", {**base, "temperature": 0})
    validate(schema_doc, "CreateChatCompletionResponse", plain)
    assert plain["choices"][0]["message"]["refusal"] is None
    n2 = post(server, "/v1/chat/completions", {**base, "n": 2, "seed": 1, "logprobs": True, "top_logprobs": 2})
    validate(schema_doc, "CreateChatCompletionResponse", n2)
    assert all(c["logprobs"]["refusal"] is None and len(c["logprobs"]["content"]) for c in n2["choices"])
    for extra in ({}, {"stream_options": {"include_usage": True}}, {"logprobs": True, "top_logprobs": 1, "n": 2}):
        chunks = stream(server, "/v1/chat/completions", {**base, **extra})
        for c in chunks:
            validate(schema_doc, "CreateChatCompletionStreamResponse", c)
        if extra.get("stream_options"):
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
            assert all(c["usage"] is None for c in chunks[:-1])
        else:
            assert all("usage" not in c for c in chunks)


def test_errors(server: LiveServer, schema_doc: dict[str, Any]) -> None:
    cases = [
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [], "max_tokens": 1}, 400),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400),
        ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404),
        ("GET", "/v1/no-such-route", None, 404),
        ("GET", "/v1/completions", None, 405),
    ]
    for method, path, body, status in cases:
        r = httpx.request(method, server.url(path), json=body, headers=server.headers, timeout=30)
        assert r.status_code == status, (path, r.text)
        validate(schema_doc, "ErrorResponse", r.json())


# ---- what the responses carry ----

def test_echo_gives_every_prompt_token_but_the_first_its_logprob(server: LiveServer) -> None:
    """Prompt logprobs (computed in prefill) equal the logprobs of the same tokens when they were
    generated (computed in decode), on the same context."""
    prompt_ids = httpx.post(server.url("/tokenize"), json={"prompt": "The capital of France is"},
                            headers=server.headers, timeout=30).json()["tokens"]
    generated = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt_ids, "max_tokens": 3,
                                                 "temperature": 0, "logprobs": 2, "ignore_eos": True})
    gen_lp = generated["choices"][0]["logprobs"]
    # the generated tokens' ids, by round trip through their text
    full_ids = httpx.post(server.url("/tokenize"), json={"prompt": "The capital of France is"
                                                         + generated["choices"][0]["text"]},
                          headers=server.headers, timeout=30).json()["tokens"]
    assert full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) == len(prompt_ids) + 3
    echo = post(server, "/v1/completions", {"model": MODEL, "prompt": full_ids, "max_tokens": 1,
                                            "temperature": 0, "echo": True, "logprobs": 2})
    lp = echo["choices"][0]["logprobs"]
    n = len(full_ids)
    assert len(lp["tokens"]) == n + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(2 <= len(t) <= 3 for t in lp["top_logprobs"][1:])
    for echoed, decoded in zip(lp["token_logprobs"][n - 3 : n], gen_lp["token_logprobs"]):
        assert echoed == pytest.approx(decoded, abs=2e-3)
    for echoed, decoded in zip(lp["top_logprobs"][n - 3 : n], gen_lp["top_logprobs"]):
        assert echoed == pytest.approx(decoded, abs=2e-3)
    assert lp["text_offset"][:n] == sorted(lp["text_offset"][:n])


def test_completion_stream_sends_no_empty_text(server: LiveServer) -> None:
    """Tokens that end inside a character send nothing until the character is whole."""
    base = {"model": MODEL, "prompt": CUT_PROMPT, "temperature": 0, "max_tokens": CUT_MAX_TOKENS + 1}
    probe = post(server, "/v1/completions", {**base, "logprobs": 0})
    tokens = probe["choices"][0]["logprobs"]["tokens"]
    assert REPLACEMENT_CHAR in tokens[0], f"no longer starts inside a character: {tokens}"
    chunks = stream(server, "/v1/completions", base)
    assert all(c["choices"][0]["text"] or c["choices"][0]["finish_reason"] for c in chunks), chunks
    assert "".join(c["choices"][0]["text"] for c in chunks) == probe["choices"][0]["text"]


def test_completion_cut_inside_a_character(server: LiveServer) -> None:
    """max_tokens ending inside a character: the text drops that half character (no U+FFFD),
    its tokens still count."""
    base = {"model": MODEL, "prompt": CUT_PROMPT, "temperature": 0, "max_tokens": CUT_MAX_TOKENS}
    probe = post(server, "/v1/completions", {**base, "logprobs": 0})
    tokens = probe["choices"][0]["logprobs"]["tokens"]
    assert REPLACEMENT_CHAR in tokens[-1], f"no longer ends inside a character: {tokens}"
    text = probe["choices"][0]["text"]
    assert REPLACEMENT_CHAR not in text and text
    assert probe["usage"]["completion_tokens"] == CUT_MAX_TOKENS
    chunks = stream(server, "/v1/completions", base)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    longer = post(server, "/v1/completions", {**base, "max_tokens": CUT_MAX_TOKENS + 4})["choices"][0]["text"]
    assert longer.startswith(text) and len(longer) > len(text)


def test_chat_cut_inside_a_character(server: LiveServer) -> None:
    base = {"model": MODEL, "messages": CUT_MESSAGES, "temperature": 0, "max_tokens": CUT_CHAT_MAX_TOKENS}
    probe = post(server, "/v1/chat/completions", {**base, "logprobs": True})
    assert REPLACEMENT_CHAR in probe["choices"][0]["logprobs"]["content"][-1]["token"], "no longer cuts a character"
    text = probe["choices"][0]["message"]["content"]
    assert REPLACEMENT_CHAR not in text
    chunks = stream(server, "/v1/chat/completions", base)
    deltas = [c["choices"][0] for c in chunks]
    assert all(d["delta"].get("content") or d["delta"].get("role") or d["finish_reason"] for d in deltas)
    assert "".join(d["delta"].get("content") or "" for d in deltas) == text
