"""A tokenizer with more tokens than the model's vocab_size (tokens added to it, not to the embedding): text
that encodes to the extra ids is refused naming the prompt or the messages and the id, offline and in the
API front end, whose bound for client token ids is the smaller of the two; other text is served. Such a
request was refused with "token ids must be integers in [0, 512)", which named nothing the user sent, and
the front end let client ids up to the tokenizer's size through to the engine. Found fuzzing LLM(path)."""
from __future__ import annotations

import json
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.errors import RequestError
from engine.server.protocol import APIError, ModelContext
from engine.server.text import TextFrontend, prepare_chat, prepare_completion

VOCAB = 512  # the tiny checkpoints' vocab_size


@pytest.fixture(scope="module")
def wide_tokenizer(tiny_llama: str, tmp_path_factory) -> tuple[str, str]:
    """(checkpoint path, an added token whose id is past VOCAB)."""
    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("wide") / "m")
    shutil.copytree(tiny_llama, path)
    tok = AutoTokenizer.from_pretrained(path)
    extra = [f"<x{i}>" for i in range(VOCAB + 8 - len(tok))]
    tok.add_tokens(extra)
    tok.save_pretrained(path)
    assert tok.convert_tokens_to_ids(extra[-1]) >= VOCAB
    return path, extra[-1]


@pytest.fixture(scope="module")
def llm(wide_tokenizer: tuple[str, str]) -> LLM:
    return LLM(wide_tokenizer[0], max_model_len=128)


def test_offline_text_beyond_the_vocabulary_is_refused_naming_the_field(llm: LLM, wide_tokenizer) -> None:
    extra = wide_tokenizer[1]
    greedy = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(RequestError) as e:
        llm.generate([f"The cat {extra}"], greedy, use_tqdm=False)
    assert e.value.param == "prompt" and "token id" in str(e.value) and "vocab_size 512" in str(e.value)
    with pytest.raises(RequestError) as e:
        llm.chat([{"role": "user", "content": f"hi {extra}"}], greedy, use_tqdm=False)
    assert e.value.param == "messages", str(e.value)
    out = llm.generate(["The cat sat"], greedy, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_front_end_bounds_ids_by_the_model_and_refuses_text_beyond_it(wide_tokenizer) -> None:
    from transformers import AutoTokenizer

    path, extra = wide_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    frontend = TextFrontend(num_workers=1, lazy=True)
    frontend.load(tokenizer, ModelContext("m", max_model_len=128, vocab_size=VOCAB))
    ctx = frontend.ctx
    assert ctx is not None and ctx.vocab_size == VOCAB < len(tokenizer)

    def body(**fields) -> bytes:
        return json.dumps({"model": "m", "max_tokens": 4, **fields}).encode()

    for raw, param in ((body(prompt=f"a {extra}"), "prompt"), (body(prompt=[1, VOCAB]), "prompt"),
                       (body(messages=[{"role": "user", "content": extra}]), "messages")):
        with pytest.raises(APIError) as e:
            (prepare_chat if b"messages" in raw else prepare_completion)(raw, ctx, tokenizer)
        assert e.value.status == 400 and e.value.param == param, e.value.body()
    assert prepare_completion(body(prompt="The cat sat"), ctx, tokenizer).request.prompts
