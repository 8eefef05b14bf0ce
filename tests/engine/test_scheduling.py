"""Preemption, chunked prefill, prefix caching and aborts give the same greedy outputs as a
roomy engine, and leave every block free; with and without async scheduling."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from tests.conftest import prompts_of_lengths

LENGTHS = [1, 5, 17, 33, 64, 100, 177, 300]
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama: str) -> list[list[int]]:
    llm = LLM(tiny_llama, enable_prefix_caching=False)
    return [o.outputs[0].token_ids for o in llm.generate(prompts_of_lengths(LENGTHS), GREEDY, use_tqdm=False)]


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def async_scheduling(request) -> bool:
    return request.param


def assert_all_free(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)


def test_preemption_same_output(tiny_llama: str, reference: list[list[int]], async_scheduling: bool) -> None:
    # 30 pages (480 tokens) preempt; max_model_len must fit in them or start-up refuses
    llm = LLM(tiny_llama, num_kv_blocks=30, block_size=16, max_model_len=480, async_scheduling=async_scheduling)
    outputs = llm.generate(prompts_of_lengths(LENGTHS), GREEDY, use_tqdm=False)
    assert llm.llm_engine.get_stats().num_preemptions_total > 0
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert_all_free(llm)


def test_chunked_prefill_same_output(tiny_llama: str, reference: list[list[int]], async_scheduling: bool) -> None:
    llm = LLM(tiny_llama, max_num_batched_tokens=48, async_scheduling=async_scheduling)
    engine = llm.llm_engine
    chunked = []
    original = engine.scheduler.schedule

    def spy(lane: int = 0):
        out, scheduled = original(lane)
        chunked.extend(s.seq_id for s in scheduled if s.num_computed_tokens < s.num_prompt_tokens)
        return out, scheduled

    engine.scheduler.schedule = spy
    outputs = llm.generate(prompts_of_lengths(LENGTHS), GREEDY, use_tqdm=False)
    assert chunked, "no prompt was split into chunks"
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert_all_free(llm)


def test_prefix_caching_same_output(tiny_llama: str, async_scheduling: bool) -> None:
    shared = prompts_of_lengths([200], seed=7)[0]
    prompts = [shared + tail for tail in prompts_of_lengths([3, 20, 45, 1], seed=8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(tiny_llama, enable_prefix_caching=False).generate(prompts, params, use_tqdm=False)]
    llm = LLM(tiny_llama, enable_prefix_caching=True, async_scheduling=async_scheduling)
    first = llm.generate(prompts[:1], params, use_tqdm=False)
    rest = llm.generate(prompts[1:], params, use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.prefix_cache_hits_total >= 3 * (200 // 16) * 16
    assert all(o.num_cached_tokens >= 192 for o in rest)
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    assert_all_free(llm)


def test_abort_frees_blocks(tiny_llama: str, async_scheduling: bool) -> None:
    llm = LLM(tiny_llama, async_scheduling=async_scheduling)
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts_of_lengths(LENGTHS)):
        engine.add_request(str(i), prompt, GREEDY)
    engine.step()
    engine.step()
    engine.abort_request(["0", "3", "7"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert {finished[i].outputs[0].finish_reason for i in ("0", "3", "7")} == {"abort"}
    assert all(finished[str(i)].outputs[0].finish_reason == "length" for i in (1, 2, 4, 5, 6))
    assert_all_free(llm)


def test_waiting_abort_and_unknown_ids(tiny_llama: str, async_scheduling: bool) -> None:
    llm = LLM(tiny_llama, async_scheduling=async_scheduling)
    engine = llm.llm_engine
    engine.add_request("a", [5, 6, 7], GREEDY)
    engine.abort_request(["a", "no-such-request"])
    outputs = engine.step()
    assert outputs[0].finished and outputs[0].outputs[0].finish_reason == "abort"
    assert_all_free(llm)


def test_async_scheduling_matches_sync(tiny_llama: str) -> None:
    """Steps scheduled on placeholders give the same tokens, logprobs and stops as one step at a
    time, for every kind of request in one batch, and finished ones free their pages."""
    prompts = prompts_of_lengths([3, 40, 120, 7, 60, 18])
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=17, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.5, frequency_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=1.0, n=2, seed=5, max_tokens=9, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[], min_tokens=4),
        SamplingParams(temperature=0.7, top_k=5, seed=2, max_tokens=25, ignore_eos=True),
    ]
    sync = LLM(tiny_llama, async_scheduling=False).generate(prompts, params, use_tqdm=False)
    llm = LLM(tiny_llama, async_scheduling=True, max_num_batched_tokens=64)
    runner = llm.llm_engine.executor.runner
    fed = []
    original = runner.prepare_inputs

    def spy(so):
        out = original(so)
        fed.append(any(runner.requests[r].token_ids[-1] == -1 for r in so.num_scheduled_tokens))
        return out

    runner.prepare_inputs = spy
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert any(fed), "no step ran on a placeholder token"
    for a, b in zip(sync, outputs):
        for x, y in zip(a.outputs, b.outputs):
            assert (x.token_ids, x.finish_reason) == (y.token_ids, y.finish_reason)
            if x.logprobs is not None:
                assert [sorted(d) for d in x.logprobs] == [sorted(d) for d in y.logprobs]
    assert_all_free(llm)
