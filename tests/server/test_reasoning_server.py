"""Reasoning end to end (issue 16): a server with --reasoning-parser deepseek_r1 splits a
regex-constrained `<think>...</think>answer` into reasoning_content (and reasoning) and content,
in the whole response and in the streamed deltas."""
from __future__ import annotations

import re

import openai
import pytest

from tests.server.conftest import MODEL, LiveServer, launch, wait_ready

PATTERN = r"<think>[a-z ]{1,16}</think>(yes|no)"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Is the sky blue? Think first."}],
        "max_tokens": 40, "temperature": 1.0, "extra_body": {"structured_outputs": {"regex": PATTERN}}}


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
