"""Sampling: seeds, top-k, stop strings and tokens, lengths, parallel samples, logprobs,
penalties, and multi-byte-safe incremental detokenisation."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.tokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def llm(tiny_llama: str, request) -> LLM:
    return LLM(tiny_llama, async_scheduling=request.param)


PROMPTS = ["The quick brown fox", "Paged attention splits", "Large language models"]


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def test_seed_reproducible_and_batch_independent(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    batched = llm.generate(PROMPTS, [params, SamplingParams(temperature=1.0, max_tokens=8), params], use_tqdm=False)
    other = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, seed=99, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert alone[0].outputs[0].token_ids == batched[0].outputs[0].token_ids
    assert other[0].outputs[0].token_ids != alone[0].outputs[0].token_ids


def test_top_k_1_equals_greedy(llm: LLM) -> None:
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    top1 = llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in top1]


def test_sampling_filters_run(llm: LLM) -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, presence_penalty=0.5,
                            frequency_penalty=0.5, repetition_penalty=1.2, seed=3, max_tokens=12, ignore_eos=True)
    out = llm.generate(PROMPTS, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in out)


def test_repetition_penalty_changes_greedy(llm: LLM) -> None:
    plain = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    penalized = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=5.0), use_tqdm=False)
    ids = penalized[0].outputs[0].token_ids
    assert ids != plain[0].outputs[0].token_ids
    assert len(set(ids)) >= len(set(plain[0].outputs[0].token_ids))


def test_stop_string_removed(llm: LLM) -> None:
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)[0]
    text = base.outputs[0].text
    assert len(text) > 6
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop]), use_tqdm=False)[0]
    out = cut.outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)]
    kept = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.outputs[0].text == text[: text.find(stop) + len(stop)]


def test_stop_token_ids_and_length(llm: LLM) -> None:
    base = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    ids = base.outputs[0].token_ids
    assert base.outputs[0].finish_reason == "length" and len(ids) == 20
    stop_id = ids[5]
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    assert out.token_ids == ids[: ids.index(stop_id) + 1]
    kept = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop_id],
                                                   include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    stop_text = llm.llm_engine.tokenizer.decode([stop_id], skip_special_tokens=True).strip()
    assert kept.token_ids == out.token_ids and kept.text.startswith(out.text)
    assert kept.text.endswith(stop_text) and (len(kept.text) > len(out.text) or not stop_text)  # left out before
    mins = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, min_tokens=10, stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert stop_id not in mins.token_ids[:10] and len(mins.token_ids) >= 10


def test_parallel_samples_share_prompt_blocks(tiny_llama: str) -> None:
    prompt = list(range(3, 3 + 160))  # ten full blocks
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=5)

    def peak_blocks(n: int, separate: bool) -> int:
        llm = LLM(tiny_llama, enable_prefix_caching=False)
        engine, peak = llm.llm_engine, 0
        if separate:
            for i in range(n):
                engine.add_request(str(i), prompt, params)
        else:
            engine.add_request("n", prompt, SamplingParams(n=n, temperature=1.0, max_tokens=4, ignore_eos=True, seed=5))
        final = []
        while engine.has_unfinished_requests():
            final += [o for o in engine.step() if o.finished]
            peak = max(peak, engine.block_manager.num_blocks - engine.block_manager.num_free_blocks)
        if not separate:
            assert len(final[0].outputs) == n and len({tuple(o.token_ids) for o in final[0].outputs}) > 1
        return peak

    shared, separate = peak_blocks(4, separate=False), peak_blocks(4, separate=True)
    assert separate == 4 * 11  # ten prompt blocks and one for the output, each
    assert shared == 9 + 4 * 2  # nine full prompt blocks shared; each sample computes the last itself


def test_logprobs(llm: LLM) -> None:
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    assert all(next(iter(entry)) == t for t, entry in zip(out.token_ids, out.logprobs))  # vLLM's: sampled first
    seeded = llm.generate(PROMPTS[0], SamplingParams(temperature=5.0, seed=1, max_tokens=8, logprobs=2),
                          use_tqdm=False)[0].outputs[0]  # hot: most sampled tokens are outside the top 2
    for t, entry in zip(seeded.token_ids, seeded.logprobs):
        assert next(iter(entry)) == t and len(entry) == (2 if entry[t].rank <= 2 else 3)
        assert sorted(lp.rank for lp in list(entry.values())[1:]) == [r for r in (1, 2) if r != entry[t].rank]
    for token_id, entry in zip(out.token_ids, out.logprobs):
        assert token_id in entry and entry[token_id].rank == 1  # greedy takes the top token
        assert len(entry) == 3 and all(lp.logprob <= 0 for lp in entry.values())
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_incremental_detokenizer_multibyte(smollm2_path: str) -> None:
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_path, is_gguf=True)
    text = "大型语言模型一次生成一个词元。😀 Paged attention!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    deltas = [detok.add_tokens([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)


def test_min_p_before_top_p_as_vllm() -> None:
    """vLLM applies min_p to the tempered distribution and top-k/top-p to what it leaves; min_p ran last, so
    top_p measured its mass over tokens min_p then dropped and kept more. probs [.5, .3, .15, .05], min_p 0.2
    drops token 3; top_p 0.82 over the rest [.53, .32, .16] keeps tokens 0 and 1 only (over all four, 0 to 2)."""
    from engine.layers.sampler import Sampler, SamplingMetadata

    rows = 400
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(rows, 1)  # [rows, 4]
    md = SamplingMetadata(temperature=torch.ones(rows), top_k=None, top_p=torch.full((rows,), 0.82),
                          min_p=torch.full((rows,), 0.2), all_greedy=False, generators={},
                          default_generator=torch.Generator().manual_seed(0))
    sampled = Sampler()(logits, md).sampled_token_ids.tolist()
    assert set(sampled) == {0, 1}
