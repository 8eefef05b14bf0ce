"""LLM.generate/chat/beam_search with arguments a user gets wrong: a ValueError (RequestError)
naming the argument, never an internal error, and the same LLM generates correctly after.
Each case was found by fuzzing the offline API."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.beam_search import BeamSearchParams
from engine.errors import RequestError
from engine.sampling_params import RequestOutputKind

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


@pytest.mark.parametrize("params,field", [
    ([{"max_tokens": 2}, SamplingParams()], "sampling_params[0]"),
    ([SamplingParams(max_tokens=2), None], "sampling_params[1]"),
    ({"max_tokens": 2}, "sampling_params"),
    ("greedy", "sampling_params"),
])
def test_sampling_params_of_another_type_name_the_field(llm: LLM, reference: list[int], params: object,
                                                         field: str) -> None:
    """They reached best_of_params: AttributeError ('dict' object has no attribute 'best_of')."""
    with pytest.raises(RequestError) as err:
        llm.generate(["a", "b"], params, use_tqdm=False)  # type: ignore[arg-type]
    assert err.value.param == field
    assert_still_generates(llm, reference)


@pytest.mark.parametrize("lora", ["sql", {"name": "sql"}, [5]], ids=["str", "dict", "list-of-int"])
def test_lora_request_of_another_type_names_the_field(llm: LLM, reference: list[int], lora: object) -> None:
    """A str was taken as one adapter per character ('3 given for 1 prompts'), a dict as unhashable."""
    with pytest.raises(RequestError) as err:
        llm.generate(["a"], SamplingParams(max_tokens=2), lora_request=lora, use_tqdm=False)  # type: ignore[arg-type]
    assert err.value.param.startswith("lora_request")
    assert "LoRARequest" in str(err.value)
    assert_still_generates(llm, reference)


@pytest.mark.parametrize("messages", [None, "hello", 5])
def test_chat_messages_of_another_type_name_the_field(llm: LLM, messages: object) -> None:
    with pytest.raises(RequestError) as err:
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)  # type: ignore[arg-type]
    assert err.value.param == "messages"


def test_beam_search_params_of_another_type_name_the_field(llm: LLM) -> None:
    with pytest.raises(RequestError) as err:
        llm.beam_search(["a"], SamplingParams(max_tokens=2), use_tqdm=False)  # type: ignore[arg-type]
    assert err.value.param == "params"


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_any_output_kind_returns_the_whole_output(llm: LLM, kind: RequestOutputKind) -> None:
    """vLLM's LLM returns each request's final output whatever output_kind says; DELTA returned only
    the last step's token (one token for max_tokens=6)."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2, output_kind=kind)
    outputs = llm.generate([PROMPT, "hello"], params, use_tqdm=False)
    expected = llm.generate([PROMPT, "hello"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2),
                            use_tqdm=False)
    for out, ref in zip(outputs, expected):
        assert [s.token_ids for s in out.outputs] == [s.token_ids for s in ref.outputs]
        assert [s.text for s in out.outputs] == [s.text for s in ref.outputs]
        assert all(len(s.token_ids) == 6 for s in out.outputs)
    assert params.output_kind == kind  # the caller's object is left as it was
