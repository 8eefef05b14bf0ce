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


def test_offline_max_tokens_past_the_context_ends_at_the_context(llm: LLM) -> None:
    """vLLM's offline engine checks the prompt alone: max_tokens past the context runs until the context is
    full and ends with "length". Here it was a RequestError, so a script's generous max_tokens=4096 failed
    the whole batch on a model with a shorter context (or beside one long prompt)."""
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    short, long = [5, 6], [3 + i for i in range(60)]
    outs = llm.generate([short, long], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [64 - 2, 64 - 60]
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "length"]
    # the same tokens as a max_tokens that fits exactly
    [exact] = llm.generate([short], SamplingParams(temperature=0, max_tokens=62, ignore_eos=True), use_tqdm=False)
    assert exact.outputs[0].token_ids == outs[0].outputs[0].token_ids
    engine = llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_server_input_processor_still_refuses_max_tokens_past_the_context(llm: LLM) -> None:
    """The API server's InputProcessor (serving defaults) keeps vLLM's server refusal, naming max_tokens."""
    from engine.errors import RequestError
    from engine.input_processor import InputProcessor

    server = InputProcessor(llm.llm_engine.info, llm.get_tokenizer())
    with pytest.raises(RequestError) as e:
        server.process("r", [5, 6], SamplingParams(max_tokens=500), arrival_time=0.0)
    assert e.value.param == "max_tokens" and "maximum context length is 64" in str(e.value)
    assert server.process("r", [5, 6], SamplingParams(max_tokens=62), arrival_time=0.0).max_tokens == 62
