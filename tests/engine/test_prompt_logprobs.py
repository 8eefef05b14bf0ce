"""SamplingParams.prompt_logprobs equals transformers' float32 log_softmax at every prompt position,
whatever the prefill path: one pass, chunked, after a prefix-cache hit, n > 1, preemption."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.outputs import RequestOutput
from tests.conftest import prompts_of_lengths

LENGTHS = [1, 2, 17, 40, 75]
K = 3


@pytest.fixture(scope="module")
def hf_logprobs(tiny_llama: str):
    """prompt -> [len(prompt), vocab] float32 log-probabilities of the next token, from transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    def run(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0]
        return logits.float().log_softmax(dim=-1)

    return run


def check(output: RequestOutput, expected: torch.Tensor, k: int = K) -> None:
    prompt, lps = output.prompt_token_ids, output.prompt_logprobs
    assert lps is not None and len(lps) == len(prompt) and lps[0] is None
    for p in range(1, len(prompt)):
        row, token, entry = expected[p - 1], prompt[p], lps[p]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        top = row.topk(k).indices.tolist()
        assert {t for t, lp in entry.items() if lp.rank <= k} == set(top)
        assert len(entry) == k + (token not in top)
        assert all(lp.decoded_token is not None for lp in entry.values())
        assert next(iter(entry)) == token  # the prompt's token first, then the top k (vLLM's order)


def test_prompt_logprobs_match_transformers(tiny_llama: str, hf_logprobs) -> None:
    prompts = prompts_of_lengths(LENGTHS)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=K, ignore_eos=True)
    # a 32-token budget computes the longer prompts in chunks
    llm = LLM(tiny_llama, dtype="float32", max_num_batched_tokens=32)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        check(out, hf_logprobs(prompt))
    assert outputs[0].prompt_logprobs == [None]  # a one-token prompt: nothing to score
    plain = llm.generate(prompts[3], SamplingParams(max_tokens=2))[0]
    assert plain.prompt_logprobs is None

    # The same prompts again: their blocks are in the prefix cache now, yet every position is scored.
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_logprobs for o in again] == [o.prompt_logprobs for o in outputs]
    assert all(o.num_cached_tokens == 0 for o in again)
    # and a request that does not ask still hits the cache
    assert llm.generate(prompts[4], SamplingParams(max_tokens=1), use_tqdm=False)[0].num_cached_tokens > 0


def test_prompt_logprobs_zero_n2_async(tiny_llama: str, hf_logprobs) -> None:
    prompt = prompts_of_lengths([50], seed=1)[0]
    llm = LLM(tiny_llama, dtype="float32", async_scheduling=True, max_num_batched_tokens=20)
    out = llm.generate(prompt, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=3, prompt_logprobs=0),
                       use_tqdm=False)[0]
    expected = hf_logprobs(prompt)
    assert len(out.outputs) == 2 and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        (entry,) = out.prompt_logprobs[p].items()  # k = 0: the prompt's own token only
        assert entry[0] == prompt[p]
        assert entry[1].logprob == pytest.approx(expected[p - 1, prompt[p]].item(), abs=1e-4)


def test_prompt_logprobs_survive_preemption(tiny_llama: str, hf_logprobs) -> None:
    prompts = prompts_of_lengths([60, 90, 120, 150], seed=2)
    llm = LLM(tiny_llama, dtype="float32", num_kv_blocks=24, block_size=16, max_model_len=384,
              max_num_batched_tokens=64)
    params = SamplingParams(temperature=0, max_tokens=60, prompt_logprobs=2, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.get_stats().num_preemptions_total > 0
    for prompt, out in zip(prompts, outputs):
        check(out, hf_logprobs(prompt), k=2)
    engine = llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
