"""logit_bias (OpenAI's), allowed_token_ids and bad_words (vLLM's extras) on the shared live server
(the embedded SmolLM2): bad keys and values are 400s naming the field; the fields steer the text."""
from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, LiveServer

HI = [{"role": "user", "content": "Tell me about Paris."}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


def token_ids(server: LiveServer, text: str) -> list[int]:
    r = httpx.post(server.url("/tokenize"), json={"model": MODEL, "prompt": text, "add_special_tokens": False},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("fields, param", [
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "x"}}, "logit_bias"),
    ({"logit_bias": {"5": True}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [5, 10**9]}, "allowed_token_ids"),
    ({"allowed_token_ids": "5"}, "allowed_token_ids"),
    ({"bad_words": "Paris"}, "bad_words"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": [3]}, "bad_words"),
    ({"use_beam_search": True, "n": 2, "temperature": 0, "allowed_token_ids": [5]}, "allowed_token_ids"),
])
def test_bad_values_are_400_naming_the_field(server: LiveServer, path: str, fields: dict, param: str) -> None:
    body = {"model": MODEL, "max_tokens": 2, **fields}
    body.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": HI})
    r = httpx.post(server.url(path), json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_openai_client_logit_bias(server: LiveServer, client: openai.OpenAI) -> None:
    (forced,) = token_ids(server, " banana")
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0,
                                       logit_bias={str(forced): 100})
    assert r.choices[0].message.content == " banana" * 3
    plain = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                      logprobs=0)
    first = plain.choices[0].logprobs.tokens[0]
    (first_id,) = token_ids(server, first)
    banned = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       logprobs=0, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.tokens[0] != first


def test_allowed_token_ids_every_sample(server: LiveServer, client: openai.OpenAI) -> None:
    words = [" yes", " no", " maybe"]
    allowed = [t for w in words for t in token_ids(server, w)]
    assert len(allowed) == 3  # one token each
    r = client.completions.create(model=MODEL, prompt="Is it raining?", max_tokens=6, temperature=1.0, n=3,
                                  seed=5, extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    assert len(r.choices) == 3
    for c in r.choices:
        assert re.fullmatch(r"( yes| no| maybe){6}", c.text), c.text


def test_bad_words(server: LiveServer, client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=0)
    tokens = plain.choices[0].logprobs.tokens
    word = next(t for t in tokens if t.startswith(" ") and t[1:].isalpha() and len(token_ids(server, t)) == 1)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
                                  extra_body={"bad_words": [word.strip()]})
    assert word in tokens and word not in r.choices[0].logprobs.tokens
