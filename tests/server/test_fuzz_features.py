"""Fuzzing structured outputs, beam search and LoRA through the API as a hostile user would: each test
is a defect found that way (a constraint the output broke, a field dropped), on one server of this module."""
from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.server.conftest import MODEL, launch, wait_ready


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    s = wait_ready(launch(tmp_path_factory.mktemp("fuzz_features")))
    yield s.base_url
    s.stop()


def _completions(base: str, **body) -> dict:
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "Answer:", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_ignore_eos_keeps_the_output_in_the_grammar(base: str) -> None:
    """ignore_eos with a constraint: the sample runs to max_tokens, but once the grammar has ended only its stop
    tokens may follow (they went on unconstrained: choice ["yes", "no"] gave 'no\\nsystem\\n\\nuser\\n...')."""
    out = _completions(base, max_tokens=16, ignore_eos=True, structured_outputs={"choice": ["yes", "no"]})
    choice = out["choices"][0]
    assert choice["text"] in ("yes", "no") and choice["finish_reason"] == "length", choice
    assert out["usage"]["completion_tokens"] == 16  # ignore_eos still generates max_tokens tokens
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    out = _completions(base, max_tokens=24, n=3, temperature=1.0, ignore_eos=True,
                       structured_outputs={"json": schema, "disable_any_whitespace": True})
    for choice in out["choices"]:  # samples end their grammar at different steps; each row is its own
        assert isinstance(json.loads(choice["text"])["a"], int), choice
    raw = _completions(base, max_tokens=6, ignore_eos=True, skip_special_tokens=False,
                       structured_outputs={"regex": "[0-9]{2}"})["choices"][0]["text"]
    assert re.fullmatch(r"[0-9]{2}(<\|im_end\|>)+", raw), raw  # what follows is the stop token, nothing else


@pytest.mark.parametrize("spec,status,message", [
    ({"json": True}, 200, None),  # the boolean schema true (the text "true" was taken, the bool refused)
    ({"json": False}, 400, "matches no output"),  # was "got none", as if no constraint had been given
    ({"json": 0}, 400, "must be a JSON schema object"),  # 0 == False: also "got none"
])
def test_boolean_json_schemas(base: str, spec: dict, status: int, message: str | None) -> None:
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "JSON:", "max_tokens": 8,
                                                  "structured_outputs": spec}, timeout=120)
    assert r.status_code == status, r.text
    if message is not None:
        assert r.json()["error"]["param"] == "structured_outputs.json" and message in r.json()["error"]["message"]


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"prompt": "JSON:", "structured_outputs": {"json": {"type": "string", "description": 10**30}}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "x-id": [-2**63 - 1]}}}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer", "description": 10**30}}}}}]}),
])
def test_schema_with_a_huge_integer_annotation(base: str, path: str, extra: dict) -> None:
    """A schema holding an integer past 64 bits where the grammar ignores it compiles; it was a 500 (the
    schema could not be encoded for the engine core)."""
    r = httpx.post(base + path, json={"model": MODEL, "max_tokens": 12, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    if choice["finish_reason"] == "stop" and "tools" not in extra:
        assert isinstance(json.loads(text), str), text
