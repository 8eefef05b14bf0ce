"""SamplingParams fields of vLLM's that a ported script sets, found missing by fuzzing the offline API
(each test names the defect it pins)."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.core_messages import EngineCoreRequest, decoder_for, encoder
from engine.sampling_params import SamplingParamsError

PROMPT = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    return LLM(tiny_llama, max_model_len=64, max_num_seqs=4)


def test_spaces_between_special_tokens_and_extra_args_are_taken(llm: LLM) -> None:
    """vLLM's SamplingParams(spaces_between_special_tokens=False) and extra_args={...} were a TypeError
    (unexpected keyword), so a script setting them could not run. The fast tokenizers this engine loads
    ignore spaces_between_special_tokens, as vLLM's fast detokenizer does: the text is the same."""
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True, skip_special_tokens=False)
    [plain] = llm.generate([PROMPT], SamplingParams(**greedy), use_tqdm=False)
    params = SamplingParams(spaces_between_special_tokens=False, extra_args={"tag": 1}, **greedy)
    assert params.spaces_between_special_tokens is False and params.extra_args == {"tag": 1}
    assert SamplingParams().spaces_between_special_tokens is True and SamplingParams().extra_args is None
    [out] = llm.generate([PROMPT], params, use_tqdm=False)
    assert out.outputs[0].token_ids == plain.outputs[0].token_ids and out.outputs[0].text == plain.outputs[0].text
    # they cross to an engine core process with the request
    request = EngineCoreRequest(request_id="r", prompt_token_ids=PROMPT, sampling_params=params, max_tokens=6,
                                arrival_time=0.0)
    back = decoder_for(EngineCoreRequest).decode(encoder.encode(request)).sampling_params
    assert back.spaces_between_special_tokens is False and back.extra_args == {"tag": 1}


@pytest.mark.parametrize("field,value", [("spaces_between_special_tokens", "no"), ("spaces_between_special_tokens", 0),
                                         ("extra_args", ["a"]), ("extra_args", {1: "a"})])
def test_bad_spaces_between_special_tokens_and_extra_args_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
