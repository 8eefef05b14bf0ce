"""n, best_of and beam_width beyond max_num_seqs offline: vLLM's LLM runs their samples max_num_seqs at a time
(found by fuzzing the offline API; they were refused naming the field)."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.beam_search import BeamSearchParams
from engine.errors import RequestError
from engine.input_processor import InputProcessor
from engine.sampling_params import MAX_N_SEQUENCES, SamplingParamsError

PROMPTS = [[5, 6, 7] + list(range(10, 40)), [9, 8, 7]]


def outputs(llm: LLM, params: SamplingParams) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_more_samples_than_max_num_seqs_run_in_turn(tiny_llama: str) -> None:
    """LLM(max_num_seqs=2) with n=5, best_of=6 or beam_width=4 was a RequestError naming n, best_of or
    beam_width; vLLM runs them. The samples are those of an engine wide enough for all at once."""
    wide = LLM(tiny_llama, max_model_len=64, max_num_seqs=16)
    narrow = LLM(tiny_llama, max_model_len=64, max_num_seqs=2, num_kv_blocks=6)  # preempts too
    for params in (SamplingParams(n=5, seed=3, max_tokens=20, ignore_eos=True),
                   SamplingParams(n=2, best_of=6, seed=1, max_tokens=10, ignore_eos=True)):
        assert outputs(narrow, params) == outputs(wide, params)
    beams = BeamSearchParams(beam_width=4, max_tokens=6)
    assert ([s.tokens for s in narrow.beam_search(PROMPTS, beams, use_tqdm=False)[0].sequences]
            == [s.tokens for s in wide.beam_search(PROMPTS, beams, use_tqdm=False)[0].sequences])
    bm = narrow.llm_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_n_keeps_vllms_bound_and_the_server_its_own(tiny_llama: str) -> None:
    for field in ("n", "best_of"):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(**{field: MAX_N_SEQUENCES + 1})
        assert e.value.param == field
    llm = LLM(tiny_llama, max_model_len=64, max_num_seqs=2)
    server = InputProcessor(llm.llm_engine.info, llm.get_tokenizer())  # the API server's (serving defaults)
    with pytest.raises(RequestError) as e:
        server.process("r", [5, 6], SamplingParams(n=3), arrival_time=0.0)
    assert e.value.param == "n" and "max_num_seqs (2)" in str(e.value)
