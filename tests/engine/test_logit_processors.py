"""vLLM's built-in logits processors: logit_bias, allowed_token_ids and bad_words, offline on the tiny
random Llama (sync and async scheduling), and the sampler metadata they build (nothing when unused)."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import RequestError
from engine.layers.sampler import Sampler
from engine.model_runner import RunnerRequestState
from engine.outputs import RequestSamplingParams
from engine.sampling_metadata import SamplingMetadataBuilder, build_sampling_metadata
from engine.sampling_params import SamplingParamsError

PROMPTS = ["The quick brown fox", "Paged attention splits", "Large language models"]
GREEDY = dict(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tiny_llama: str, request) -> LLM:
    return LLM(tiny_llama, async_scheduling=request.param)


def generate(llm: LLM, prompts: list[str] | str, params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """Each output's token ids (all samples of a request, in order)."""
    return [[t for o in out.outputs for t in o.token_ids] for out in llm.generate(prompts, params, use_tqdm=False)]


def test_logit_bias_forces_and_forbids(llm: LLM) -> None:
    (plain,) = generate(llm, PROMPTS[0], SamplingParams(**GREEDY))
    target = next(t for t in range(300, 512) if t not in plain)
    (forced,) = generate(llm, PROMPTS[0], SamplingParams(**GREEDY, logit_bias={target: 100}))
    assert forced == [target] * len(plain)
    banned = {t: -100.0 for t in set(plain)}
    (avoided,) = generate(llm, PROMPTS[0], SamplingParams(**GREEDY, logit_bias=banned))
    assert avoided and not set(avoided) & set(plain)
    # string keys, as OpenAI sends them (vLLM converts them too)
    (by_str,) = generate(llm, PROMPTS[0], SamplingParams(**GREEDY, logit_bias={str(target): 100}))
    assert by_str == forced


def test_logprobs_are_raw(llm: LLM) -> None:
    """As vLLM's default (and Gantry's penalties): the model's logprobs, before the bias."""
    (plain,) = generate(llm, PROMPTS[0], SamplingParams(**GREEDY))
    target = next(t for t in range(300, 512) if t not in plain)
    out = llm.generate(PROMPTS[0], SamplingParams(**GREEDY, logit_bias={target: 100}, logprobs=2), use_tqdm=False)
    first = out[0].outputs[0].logprobs[0]
    assert first[target].logprob < -1.0 and first[target].rank > 1


@pytest.mark.parametrize("seed", [None, 7])
def test_allowed_token_ids_restrict_every_sample(llm: LLM, seed: int | None) -> None:
    allowed = [5, 17, 200, 311]
    params = SamplingParams(n=3, temperature=1.5, seed=seed, max_tokens=16, ignore_eos=True, allowed_token_ids=allowed)
    outs = generate(llm, PROMPTS, params)
    assert all(len(ids) == 48 and set(ids) <= set(allowed) for ids in outs)
    assert len({t for ids in outs for t in ids}) > 1  # sampled, not stuck on one token
    (greedy,) = generate(llm, PROMPTS[0], SamplingParams(**GREEDY, allowed_token_ids=[311]))
    assert greedy == [311] * 12


def _single_token_word(llm: LLM, tokens: list[int]) -> tuple[str, int]:
    """A word that one of tokens is, whole (with or without its leading space)."""
    tok = llm.get_tokenizer()
    for t in tokens:
        word = tok.decode([t]).strip()
        if word and t in (tok.encode(word, add_special_tokens=False) + tok.encode(" " + word, add_special_tokens=False)):
            ids = SamplingParams(bad_words=[word])
            ids.update_from_tokenizer(tok)
            if [t] in ids.bad_words_token_ids:
                return word, t
    raise AssertionError("no generated token is a whole word")


def _two_token_word(llm: LLM, tokens: list[int]) -> tuple[str, list[int]]:
    """A word made of two consecutive generated tokens that tokenizes back to them."""
    tok = llm.get_tokenizer()
    for a, b in zip(tokens, tokens[1:]):
        word = tok.decode([a, b])
        if word == word.lstrip() and tok.encode(word, add_special_tokens=False) == [a, b]:
            return word, [a, b]
    raise AssertionError("no two generated tokens make a word that tokenizes back to them")


def test_bad_words_single_token(llm: LLM) -> None:
    (plain,) = generate(llm, PROMPTS[1], SamplingParams(**GREEDY))
    word, token = _single_token_word(llm, plain)
    (out,) = generate(llm, PROMPTS[1], SamplingParams(**GREEDY, bad_words=[word]))
    assert token in plain and token not in out


def test_bad_words_multi_token(llm: LLM) -> None:
    """Only the last token is masked, and only right after the rest of the word."""
    (plain,) = generate(llm, PROMPTS[2], SamplingParams(**{**GREEDY, "max_tokens": 24}))
    word, (a, b) = _two_token_word(llm, plain)
    (out,) = generate(llm, PROMPTS[2], SamplingParams(**{**GREEDY, "max_tokens": 24}, bad_words=[word]))
    first = next(i for i in range(len(plain) - 1) if plain[i : i + 2] == [a, b])
    assert out[: first + 1] == plain[: first + 1]  # the same until the word would complete
    assert out[first + 1] != b
    assert all(out[i : i + 2] != [a, b] for i in range(len(out) - 1))


def test_mixed_batch_each_as_alone(llm: LLM) -> None:
    (plain,) = generate(llm, PROMPTS[0], SamplingParams(**GREEDY))
    target = next(t for t in range(300, 512) if t not in plain)
    word, _ = _single_token_word(llm, plain)
    params = [
        SamplingParams(**GREEDY),
        SamplingParams(**GREEDY, logit_bias={target: 100}),
        SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, allowed_token_ids=[5, 17, 200]),
        SamplingParams(**GREEDY, bad_words=[word]),
        SamplingParams(**GREEDY, repetition_penalty=2.0, logit_bias={target: -5.0}),
        SamplingParams(temperature=0.8, seed=11, max_tokens=12, ignore_eos=True),
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    batched = generate(llm, prompts, params)
    alone = [generate(llm, p, q)[0] for p, q in zip(prompts, params)]
    assert batched == alone


def test_refused_naming_the_field(llm: LLM) -> None:
    vocab = 512
    for params, field in ((SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
                          (SamplingParams(allowed_token_ids=[3, vocab + 5]), "allowed_token_ids")):
        with pytest.raises(RequestError) as e:
            llm.generate(PROMPTS[0], params, use_tqdm=False)
        assert e.value.param == field and str(vocab) in str(e.value)
    for kwargs, field in ((dict(allowed_token_ids=[]), "allowed_token_ids"), (dict(logit_bias={"x": 1}), "logit_bias"),
                          (dict(logit_bias={1: float("nan")}), "logit_bias"), (dict(bad_words=[""]), "bad_words"),
                          (dict(bad_words="word"), "bad_words"), (dict(allowed_token_ids=[-1]), "allowed_token_ids")):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(**kwargs)
        assert e.value.param == field


# ---- the sampler's inputs: built from small index tensors, nothing when no row uses them ----

def _state(token_ids: list[int], num_prompt: int, **kw) -> RunnerRequestState:
    base = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, presence_penalty=0.0,
                frequency_penalty=0.0, repetition_penalty=1.0, has_penalties=False, min_tokens=0, stop_token_ids=[],
                eos_token_ids=[2], logprobs=None, prompt_logprobs=None, num_prompt_tokens=num_prompt)
    return RunnerRequestState(token_ids, [0], len(token_ids), RequestSamplingParams(**{**base, **kw}), 0, len(token_ids))


def test_unused_builds_nothing() -> None:
    md = build_sampling_metadata([_state([1, 2, 3], 2), _state([4, 5], 1)], 64, torch.device("cpu"), None)
    assert md.allowed_token_mask is None and md.logit_bias is None and md.bad_words_bans == []
    assert not md.modifies_logits  # an all-greedy batch is a plain argmax


def test_metadata_and_sampler() -> None:
    vocab = 16
    states = [
        _state([1, 2, 3], 2),  # untouched
        _state([1, 2, 3], 2, logit_bias={9: 100.0, 4: -3.0}),
        _state([1, 2], 2, allowed_token_ids=[7, 8]),
        # generated [3, 5]: "5 6" completes after 5; "3 9" does not (its prefix is not the last token);
        # "2 10": 2 is the prompt's, which does not count; "11" always
        _state([1, 2, 3, 5], 2, bad_words_token_ids=[[5, 6], [3, 9], [2, 3, 10], [11]]),
    ]
    builder = SamplingMetadataBuilder(vocab, torch.device("cpu"))
    md = builder.build(states, None)
    rows, disallowed = md.allowed_token_mask
    assert rows.tolist() == [2] and disallowed.shape == (1, vocab)
    assert sorted(torch.nonzero(~disallowed[0]).flatten().tolist()) == [7, 8]
    bans = sorted((r, t) for rows, ids in md.bad_words_bans for r, t in zip(rows.tolist(), ids.tolist()))
    assert bans == [(3, 6), (3, 11)]
    logits = torch.zeros(4, vocab)
    logits[:, 6] = logits[:, 11] = 1.0  # row 3's favourites, both banned
    logits[:, 0] = 0.5
    out = Sampler()(logits.clone(), md)
    assert out.sampled_token_ids.tolist() == [6, 9, 7, 0]
    # the params' tensors are kept while the batch is unchanged; the bans follow the tokens
    states[3].token_ids.append(9)
    again = builder.build(states, None)
    assert again.logit_bias is md.logit_bias and again.allowed_token_mask is md.allowed_token_mask
    assert sorted(t for _, ids in again.bad_words_bans for t in ids.tolist()) == [11]
