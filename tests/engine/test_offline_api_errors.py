"""LLM.generate/chat/beam_search with arguments a user gets wrong: a ValueError (RequestError)
naming the argument, never an internal error, and the same LLM generates correctly after.
Each case was found by fuzzing the offline API."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.beam_search import BeamSearchParams
from engine.errors import RequestError

PROMPT = [5, 6, 7, 8]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    return LLM(tiny_llama, max_model_len=64, max_num_seqs=8)


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[int]:
    return llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def assert_still_generates(llm: LLM, reference: list[int]) -> None:
    assert llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == reference
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("token_ids", [[-1], [5, -(2**70)], [10**30], [5, 2**63]],
                         ids=["negative", "huge-negative", "huge", "int64-overflow"])
def test_out_of_range_token_ids_name_the_prompt(llm: LLM, reference: list[int], token_ids: list[int]) -> None:
    """The tokenizer decoded them before the range check: OverflowError."""
    with pytest.raises(RequestError) as err:
        llm.generate([token_ids], SamplingParams(max_tokens=2), use_tqdm=False)
    assert err.value.param == "prompt"
    with pytest.raises(RequestError) as err:
        llm.beam_search([token_ids], BeamSearchParams(beam_width=2, max_tokens=2), use_tqdm=False)
    assert err.value.param == "prompt"
    assert_still_generates(llm, reference)
