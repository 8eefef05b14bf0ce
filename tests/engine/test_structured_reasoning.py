"""Structured outputs with a reasoning parser (issue 16): the grammar starts after `</think>`.

Unit level, on the embedded SmolLM2's tokenizer: the StructuredOutputManager fed fixed token sequences
(the tag split across tokens at every place, content in the tag's last token, a tag never emitted,
qwen3 opening <think> or not); offline, deepseek_r1 without a tag is never constrained.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from engine import LLM, SamplingParams
from engine.core_messages import EngineCoreOutput
from engine.structured import StructuredOutputsParams
from engine.structured.manager import StructuredOutputManager
from engine.structured.reasoning import END, ThinkTokens

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
VOCAB = 49152  # SmolLM2's


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: str):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path, is_gguf=True)


@pytest.fixture(scope="module")
def manager(tokenizer) -> StructuredOutputManager:
    return StructuredOutputManager(lambda: tokenizer, VOCAB)


class Sample:
    """One constrained sample driven by hand: the scheduler's and engine core's parts of it."""

    def __init__(self, manager: StructuredOutputManager, rid: str, **spec) -> None:
        self.manager, self.rid = manager, rid
        params = SimpleNamespace(structured_outputs=StructuredOutputsParams(**spec), min_tokens=0)
        self.seq = SimpleNamespace(seq_id=rid, index=0, num_output_tokens=0)
        self.seq.request = SimpleNamespace(request_id=rid, params=params, seqs=[self.seq])
        manager.add_request(self.seq.request, [2])

    def mask(self) -> torch.Tensor | None:
        """[vocab] bool: the tokens allowed next; None when the sample is not constrained."""
        bitmask, ids = self.manager.grammar_bitmask([self.seq])
        if bitmask is None:
            return None
        assert ids == [self.rid]
        bits = (bitmask[0].to(torch.int64).unsqueeze(1) >> torch.arange(32)) & 1  # [words, 32]
        return bits.flatten()[:VOCAB].bool()

    def feed(self, token_ids: list[int], check: bool = True) -> None:
        """Accept tokens one step each; with check, each must be one the step's mask allows."""
        for t in token_ids:
            mask = self.mask()
            if check and mask is not None:
                assert mask[t], t
            self.manager.accept_tokens([EngineCoreOutput(request_id=self.rid, index=0, new_token_ids=[t])])
            self.seq.num_output_tokens += 1

    def free(self) -> None:
        self.manager.free(self.rid)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("cut", range(1, len(END)))
def test_deepseek_r1_grammar_starts_after_a_split_end_tag(manager, tokenizer, cut: int) -> None:
    s = Sample(manager, f"r1-{cut}", json=SCHEMA, reasoning_parser="deepseek_r1")
    reasoning = encode(tokenizer, "Hmm, maybe 7" + END[:cut]) + encode(tokenizer, END[cut:])
    for t in reasoning:
        assert s.mask() is None  # reasoning: unconstrained, even the tokens of the tag
        s.feed([t])
    mask = s.mask()
    assert mask is not None and not mask[encode(tokenizer, "Hello")[0]] and mask[encode(tokenizer, '{"')[0]]
    s.feed(encode(tokenizer, '{"a": 7}') + [2])  # each token allowed in turn, then EOS
    assert s.mask() is None  # terminated: its stop token ends it
    s.free()


def test_tag_never_emitted_is_never_constrained(manager, tokenizer) -> None:
    s = Sample(manager, "never", json=SCHEMA, reasoning_parser="deepseek_r1")
    text = "I think </thin k> is not the tag, nor </THINK>; <think> neither"
    for t in encode(tokenizer, text):
        assert s.mask() is None
        s.feed([t])
    s.free()


def test_content_in_the_tags_last_token_is_taken_by_the_grammar(manager, tokenizer) -> None:
    """A token `>"` ends the tag and starts the content: the grammar takes its `"`..."""
    Sample(manager, "warm", choice=["x"]).free()  # loads the tokenizer's bytes
    token = manager.think_tokens.vocab.index(b'>"')
    s = Sample(manager, "rest", choice=['"yes"', '"no!"'], reasoning_parser="deepseek_r1")
    s.feed(encode(tokenizer, "ok</think") + [token])
    mask = s.mask()  # ...so only the choices' continuations are allowed now
    assert mask is not None and mask[encode(tokenizer, "yes")[0]] and not mask[encode(tokenizer, "maybe")[0]]
    s.free()
    # ...and content the grammar cannot take drops the constraint rather than constrain from a stale state
    s = Sample(manager, "bad-rest", choice=["0"], reasoning_parser="deepseek_r1")
    s.feed(encode(tokenizer, "ok</think") + [token])
    assert s.mask() is None
    s.free()


def test_qwen3_opening_think_defers_the_grammar(manager, tokenizer) -> None:
    """SmolLM2 has no <think> token: here the grammar itself allows the tag's pieces, then restarts after it."""
    s = Sample(manager, "q-think", regex=r'(<think>[a-z]+</think>)?\{"a": [0-9]\}', reasoning_parser="qwen3")
    s.feed(encode(tokenizer, "<think>"))  # `<`, `think`, `>`: undecided until the tag is whole
    for t in encode(tokenizer, "Let me see.") + encode(tokenizer, "</think>"):
        assert s.mask() is None  # reasoning, though the grammar allows only [a-z] there
        s.feed([t])
    mask = s.mask()
    assert mask is not None and mask[encode(tokenizer, '{"')[0]] and not mask[encode(tokenizer, "Hello")[0]]
    s.feed(encode(tokenizer, '{"a": 1}') + [2])  # the grammar from its start again
    assert s.mask() is None
    s.free()


def test_qwen3_start_allows_a_whole_think_token_beside_the_grammar() -> None:
    tokens = ThinkTokens([b"<", b"think", b">", b"<think>", b" <think>\n", b"{", b"<think>x"], 40, {5})
    row = tokens.opening_row()  # [2] int32 words
    assert row.shape == (2,) and row.tolist() == [(1 << 3) | (1 << 4) | (1 << 6), 0]


def test_qwen3_without_think_is_constrained_from_the_first_token(manager, tokenizer) -> None:
    s = Sample(manager, "q-plain", json=SCHEMA, reasoning_parser="qwen3")
    plain = Sample(manager, "plain", json=SCHEMA)
    assert torch.equal(s.mask(), plain.mask())  # this vocabulary has no whole <think> token
    plain.free()
    s.feed(encode(tokenizer, '{"a": 12}'))
    mask = s.mask()
    assert mask is not None and mask[2] and int(mask.sum()) < 10  # the object is closed: EOS or whitespace
    s.free()


def test_enable_in_reasoning_constrains_from_the_first_token(manager, tokenizer) -> None:
    s = Sample(manager, "in", json=SCHEMA, reasoning_parser="deepseek_r1", enable_in_reasoning=True)
    mask = s.mask()
    assert mask is not None and not mask[encode(tokenizer, "Hmm")[0]]
    s.free()
    assert not manager.samples


def test_unknown_reasoning_parser_is_named() -> None:
    with pytest.raises(ValueError, match=r"structured_outputs.reasoning_parser.*deepseek_r1"):
        StructuredOutputsParams(json=SCHEMA, reasoning_parser="deepseek")


def test_offline_deepseek_r1_without_end_tag_finishes_by_length_unconstrained() -> None:
    llm = LLM(dtype="float32", async_scheduling=False)
    try:
        so = StructuredOutputsParams(json=SCHEMA, reasoning_parser="deepseek_r1")
        gated, plain = llm.generate(["Say hi."] * 2, [
            SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=so),
            SamplingParams(temperature=0.0, max_tokens=8)])
        assert gated.outputs[0].finish_reason == "length"
        assert gated.outputs[0].token_ids == plain.outputs[0].token_ids  # the grammar never applied
        with pytest.raises(json.JSONDecodeError):
            json.loads(gated.outputs[0].text)
    finally:
        llm.llm_engine.shutdown()
