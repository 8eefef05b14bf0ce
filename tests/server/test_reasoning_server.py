"""Reasoning end to end (issue 16): a server with --reasoning-parser deepseek_r1 splits a
regex-constrained `<think>...</think>answer` into reasoning_content (and reasoning) and content,
in the whole response and in the streamed deltas (the regex covers the reasoning: enable_in_reasoning).
A constraint otherwise starts after the reasoning: deepseek_r1 without `</think>` is never constrained;
qwen3 without `<think>` is constrained from the first token."""
from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

from tests.server.conftest import MODEL, LiveServer, launch, wait_ready

PATTERN = r"<think>[a-z ]{1,16}</think>(yes|no)"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Is the sky blue? Think first."}],
        "max_tokens": 40, "temperature": 1.0,
        "extra_body": {"structured_outputs": {"regex": PATTERN, "enable_in_reasoning": True}}}
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]}
JSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> openai.OpenAI:
    server: LiveServer = wait_ready(launch(tmp_path_factory.mktemp("reasoning"), "--reasoning-parser", "deepseek_r1"))
    yield openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    server.stop()


def test_reasoning_split_whole_and_streamed(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(n=3, **BODY)
    for choice in r.choices:
        extra = choice.message.model_extra
        assert re.fullmatch(r"[a-z ]{1,16}", extra["reasoning_content"])
        assert extra["reasoning"] == extra["reasoning_content"]
        assert choice.message.content in ("yes", "no")
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(stream=True, **BODY):
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            reasoning += extra.get("reasoning_content") or ""
            content += c.delta.content or ""
            assert "<think>" not in (c.delta.content or "") and "</think>" not in reasoning
    assert re.fullmatch(r"[a-z ]{1,16}", reasoning) and content in ("yes", "no"), (reasoning, content)


def test_constraint_waits_for_the_end_of_reasoning(client: openai.OpenAI) -> None:
    """SmolLM2 never writes </think>: the whole output reasons, unconstrained, until max_tokens."""
    r = client.chat.completions.create(model=MODEL, messages=BODY["messages"], max_tokens=6, temperature=0.0,
                                       response_format=JSON_FORMAT)
    unconstrained = client.chat.completions.create(model=MODEL, messages=BODY["messages"], max_tokens=6,
                                                   temperature=0.0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    assert choice.message.model_extra["reasoning_content"] == unconstrained.choices[0].message.model_extra[
        "reasoning_content"]


@pytest.fixture(scope="module")
def qwen3_client(tmp_path_factory: pytest.TempPathFactory) -> openai.OpenAI:
    server: LiveServer = wait_ready(launch(tmp_path_factory.mktemp("qwen3"), "--reasoning-parser", "qwen3"))
    yield openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_qwen3_without_reasoning_is_constrained_from_the_start(qwen3_client: openai.OpenAI, stream: bool) -> None:
    kwargs = {"model": MODEL, "messages": BODY["messages"], "max_tokens": 30, "temperature": 0.0,
              "response_format": JSON_FORMAT}
    if not stream:
        message = qwen3_client.chat.completions.create(**kwargs).choices[0].message
        content, reasoning = message.content, message.model_extra["reasoning_content"]
    else:
        content, reasoning = "", None
        for chunk in qwen3_client.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                content += c.delta.content or ""
                reasoning = (c.delta.model_extra or {}).get("reasoning_content") or reasoning
    assert reasoning is None
    jsonschema.validate(json.loads(content), SCHEMA)
