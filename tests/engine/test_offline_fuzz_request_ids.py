"""Request ids through the engine API (vLLM's LLMEngine.add_request takes any string): found by fuzzing."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.errors import RequestError

GREEDY = dict(temperature=0, max_tokens=4, ignore_eos=True)


def run(engine, requests: list[tuple[str, int]]) -> dict:
    for request_id, n in requests:
        engine.add_request(request_id, [5, 6, 7], SamplingParams(n=n, **GREEDY))
    finished = {}
    for _ in range(50):
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
        if not engine.has_unfinished_requests():
            break
    return finished


@pytest.mark.parametrize("first,second,clash", [
    (("a", 2), ("a#1", 1), True),  # a#0, a#1 | a#1
    (("b#0", 1), ("b", 2), True),  # b#0 | b#0, b#1
    (("c#2", 1), ("c", 3), True),
    (("d#1", 2), ("d", 3), False),  # d#1#0, d#1#1 | d#0, d#1, d#2
    (("e", 2), ("e#2", 1), False),  # e#0, e#1 | e#2
])
def test_a_request_id_that_names_another_requests_sample_is_refused(tiny_llama: str, first: tuple, second: tuple,
                                                                    clash: bool) -> None:
    """Request "a" with n=2 has samples "a#0" and "a#1"; a request "a#1" (n=1) got the same sequence id, the two
    shared the runners' state and pages, and neither ever finished (the step loop spun, pages leaked)."""
    engine = LLM(tiny_llama, max_model_len=64, max_num_seqs=8).llm_engine
    engine.add_request(first[0], [5, 6, 7], SamplingParams(n=first[1], **GREEDY))
    if clash:
        with pytest.raises(RequestError) as e:
            engine.add_request(second[0], [9, 10, 11], SamplingParams(n=second[1], **GREEDY))
        assert e.value.param == "request_id"
        second = (second[0] + "x", second[1])
    finished = run(engine, [second])
    assert sorted(finished) == sorted([first[0], second[0]])
    assert all(len(c.token_ids) == 4 for o in finished.values() for c in o.outputs)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_engine_add_request_takes_vllms_prompt_dicts(tiny_llama: str) -> None:
    """vLLM's LLMEngine.add_request(request_id, prompt, params) takes {"prompt": ...} and {"prompt_token_ids": ...}
    as LLM.generate does; a dict was read as its keys and refused as bad token ids ("prompt: token ids must be
    integers")."""
    engine = LLM(tiny_llama, max_model_len=64, max_num_seqs=8).llm_engine
    engine.add_request("ids", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(**GREEDY))
    engine.add_request("list", [5, 6, 7], SamplingParams(**GREEDY))
    engine.add_request("text", {"prompt": "the cat"}, SamplingParams(**GREEDY))
    engine.add_request("str", "the cat", SamplingParams(**GREEDY))
    finished = run(engine, [])
    assert finished["ids"].outputs[0].token_ids == finished["list"].outputs[0].token_ids
    assert finished["text"].outputs[0].token_ids == finished["str"].outputs[0].token_ids
    assert finished["text"].prompt == "the cat"
    with pytest.raises(RequestError) as e:
        engine.add_request("bad", {"prompt_token_ids": [5], "multi_modal_data": {}}, SamplingParams(**GREEDY))
    assert e.value.param == "prompt.multi_modal_data"
