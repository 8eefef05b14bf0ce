"""add_special_tokens as vLLM reads it: /v1/completions adds the tokenizer's special tokens (a BOS) to a text
prompt unless told false; chat adds none beyond what the template writes unless told true; /tokenize defaults as
the route it stands for. Token-id prompts are taken as they are. No live server: engine/server/text.py's
functions with a tokenizer that records what it was asked."""
from __future__ import annotations

import json

import pytest

from engine.server.protocol import APIError, ModelContext
from engine.server.text import prepare_chat, prepare_completion, tokenize

CTX = ModelContext("tiny", max_model_len=64, vocab_size=16)


class RecordingTokenizer:
    chat_template = "{% for m in messages %}{{ m.content }} {% endfor %}"

    def __init__(self) -> None:
        self.asked: list[bool] = []

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None, tokenize: bool = False,
                            **options) -> str:
        return " ".join(m["content"] for m in messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.asked.append(add_special_tokens)
        return ([1] if add_special_tokens else []) + [2] * len(text.split())


@pytest.mark.parametrize("field,want_ids,want_asked", [
    ({}, [1, 2, 2], [True]),
    ({"add_special_tokens": True}, [1, 2, 2], [True]),
    ({"add_special_tokens": False}, [2, 2], [False]),
])
def test_add_special_tokens_reaches_the_tokenizer(field: dict, want_ids: list[int], want_asked: list[bool]) -> None:
    tokenizer = RecordingTokenizer()
    body = json.dumps({"prompt": "two words", "max_tokens": 1, **field}).encode()
    prepared = prepare_completion(body, CTX, tokenizer)
    assert prepared.request.prompts == [want_ids] and tokenizer.asked == want_asked


def test_token_ids_are_taken_as_they_are() -> None:
    tokenizer = RecordingTokenizer()
    prepared = prepare_completion(json.dumps({"prompt": [3, 4], "max_tokens": 1, "add_special_tokens": False}).encode(),
                                  CTX, tokenizer)
    assert prepared.request.prompts == [[3, 4]] and tokenizer.asked == []


def test_add_special_tokens_must_be_a_boolean() -> None:
    with pytest.raises(APIError) as e:
        prepare_completion(b'{"prompt": "x", "add_special_tokens": "no"}', CTX, RecordingTokenizer())
    assert e.value.param == "add_special_tokens"


CHAT = {"messages": [{"role": "user", "content": "two words"}], "max_tokens": 1}


@pytest.mark.parametrize("field,want_ids,want_asked", [
    ({}, [2, 2], [False]),
    ({"add_special_tokens": False}, [2, 2], [False]),
    ({"add_special_tokens": True}, [1, 2, 2], [True]),
])
def test_chat_adds_special_tokens_only_when_asked(field: dict, want_ids: list[int], want_asked: list[bool]) -> None:
    tokenizer = RecordingTokenizer()
    prepared = prepare_chat(json.dumps({**CHAT, **field}).encode(), CTX, tokenizer)
    assert prepared.prompt_token_ids == want_ids and tokenizer.asked == want_asked


@pytest.mark.parametrize("body,want_ids", [
    ({"prompt": "two words"}, [1, 2, 2]),
    ({"prompt": "two words", "add_special_tokens": False}, [2, 2]),
    ({"messages": CHAT["messages"]}, [2, 2]),
    ({"messages": CHAT["messages"], "add_special_tokens": True}, [1, 2, 2]),
])
def test_tokenize_defaults_as_its_route(body: dict, want_ids: list[int]) -> None:
    assert tokenize(json.dumps(body).encode(), CTX, RecordingTokenizer())[0] == want_ids
