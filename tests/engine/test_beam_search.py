"""Beam search (LLM.beam_search) equals transformers' generate(num_beams=...) on tiny random float32
Llama, Qwen2 and Qwen3 checkpoints; its beams share KV pages through the prefix cache, free them all
at the end or on abort, and give the same beams when a small pool preempts. best_of keeps the n
samples with the highest cumulative logprob."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from engine import LLM, SamplingParams
from engine.beam_search import BeamSearchParams
from engine.errors import RequestError
from engine.sampling_params import SamplingParamsError
from tests.conftest import TINY_ARCHS, prompts_of_lengths, write_tiny_checkpoint

PROMPTS = prompts_of_lengths([5, 23], seed=7)
MAX_TOKENS = 8
# (length_penalty, early_stopping): transformers' default, its "canonical" setting, and stop-when-full
SETTINGS = [(1.0, False), (0.0, "never"), (2.0, True)]


def _set_eos(path: str, eos: int) -> None:
    """Make `eos` the checkpoint's EOS (config and generation config); the tokenizer's </s> stays one too."""
    for name in ("config.json", "generation_config.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            with open(file) as f:
                data = json.load(f)
            data["eos_token_id"] = eos
            with open(file, "w") as f:
                json.dump(data, f)


@pytest.fixture(scope="module", params=["llama-untied", "qwen2", "qwen3"])
def beam_model(request, tmp_path_factory):
    """(HF model, LLM, EOS ids) for a checkpoint whose EOS the model really emits: the third greedy
    token after PROMPTS[0], so beams finish at different lengths."""
    from transformers import AutoModelForCausalLM

    spec = dict(TINY_ARCHS[request.param])
    path = write_tiny_checkpoint(str(tmp_path_factory.mktemp(request.param)), spec.pop("arch"), **spec)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    greedy = hf.generate(torch.tensor([PROMPTS[0]]), attention_mask=torch.ones(1, len(PROMPTS[0]), dtype=torch.long),
                         max_new_tokens=3, do_sample=False, pad_token_id=0)
    _set_eos(path, int(greedy[0, -1]))
    llm = LLM(path, dtype="float32", max_model_len=256, num_kv_blocks=128)
    eos_ids = sorted(llm.llm_engine.eos_token_ids)
    assert len(eos_ids) == 2  # the chosen one and </s>: two EOS ids, as Llama 3 and Qwen have
    return hf, llm, eos_ids


def hf_beams(hf, prompt: list[int], width: int, max_tokens: int, length_penalty: float, early_stopping: bool | str,
             eos_ids: list[int] | None) -> list[tuple[list[int], float]]:
    """transformers' beams (generated ids up to and with EOS, sequences_scores), best first."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, num_beams=width, num_return_sequences=width, do_sample=False,
                              length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos_ids,
                              pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      generation_config=config)
    beams = []
    for seq, score in zip(out.sequences, out.sequences_scores):
        gen = seq[len(prompt):].tolist()
        ends = [i for i, t in enumerate(gen) if t in (eos_ids or [])]
        beams.append((gen[: ends[0] + 1] if ends else gen, float(score)))
    return beams


@pytest.mark.slow
@pytest.mark.parametrize("beam_width", [2, 4, 8])
def test_beams_match_transformers(beam_model, beam_width: int) -> None:
    hf, llm, eos_ids = beam_model
    cases = [(prompt, length_penalty, early_stopping) for length_penalty, early_stopping in SETTINGS for prompt in PROMPTS]
    params = [BeamSearchParams(beam_width, MAX_TOKENS, length_penalty=lp, early_stopping=es) for _, lp, es in cases]
    outputs = llm.beam_search([prompt for prompt, _, _ in cases], params, use_tqdm=False)  # all searched together
    reasons = set()
    for (prompt, length_penalty, early_stopping), out in zip(cases, outputs):
        expected = hf_beams(hf, prompt, beam_width, MAX_TOKENS, length_penalty, early_stopping, eos_ids)
        where = f"width {beam_width}, length_penalty {length_penalty}, early_stopping {early_stopping}"
        assert [s.output_token_ids for s in out.sequences] == [ids for ids, _ in expected], where
        for seq, (ids, score) in zip(out.sequences, expected):
            assert abs(seq.score - score) <= 1e-4, where
            assert seq.tokens[: len(prompt)] == prompt
            assert seq.score == pytest.approx(seq.cum_logprob / len(ids) ** length_penalty)
            assert seq.cum_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(ids, seq.logprobs)))
            assert all(lp[t].rank >= 1 for t, lp in zip(ids, seq.logprobs))
            assert seq.finish_reason == ("stop" if ids[-1] in eos_ids else "length")
            reasons.add(seq.finish_reason)
    assert "stop" in reasons  # EOS handling was exercised ("length": test_ignore_eos_and_text)


def test_ignore_eos_and_text(beam_model) -> None:
    hf, llm, eos_ids = beam_model
    [out] = llm.beam_search([PROMPTS[0]], BeamSearchParams(4, MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    expected = hf_beams(hf, PROMPTS[0], 4, MAX_TOKENS, 1.0, False, None)
    assert [s.output_token_ids for s in out.sequences] == [ids for ids, _ in expected]
    assert all(s.finish_reason == "length" for s in out.sequences)
    assert any(set(s.output_token_ids) & set(eos_ids) for s in out.sequences)  # EOS went on as a token
    tok = llm.get_tokenizer()
    assert [s.text for s in out.sequences] == [tok.decode(s.output_token_ids, skip_special_tokens=True)
                                               for s in out.sequences]
    # each token's Logprob names it, as vLLM's beams do (the steps run with detokenize=False: it was None)
    assert all([entry[t].decoded_token for t, entry in zip(s.output_token_ids, s.logprobs)] ==
               [tok.decode([t]) for t in s.output_token_ids] for s in out.sequences)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("beam-llama")), "LlamaForCausalLM", tie=False)


def _track_peak(llm: LLM) -> dict[str, int]:
    """Record the most KV blocks in use right after any allocation (the peak of a step)."""
    bm = llm.llm_engine.block_manager
    peak = {"used": 0}
    allocate = bm.allocate

    def tracked(*args, **kwargs):
        ok = allocate(*args, **kwargs)
        peak["used"] = max(peak["used"], bm.num_blocks - bm.num_free_blocks)
        return ok

    bm.allocate = tracked
    return peak


LONG_PROMPT = prompts_of_lengths([300], seed=3)[0]
LONG_PARAMS = BeamSearchParams(8, 10, ignore_eos=True)  # every beam runs the whole length


@pytest.fixture(scope="module")
def long_beams(llama_path: str):
    """A width-8 search on a 300-token prompt in a roomy pool: (LLM, its output, peak blocks in use)."""
    llm = LLM(llama_path, dtype="float32", max_model_len=512, num_kv_blocks=128, block_size=16)
    peak = _track_peak(llm)
    [out] = llm.beam_search([LONG_PROMPT], LONG_PARAMS, use_tqdm=False)
    return llm, out, peak["used"]


def test_beams_share_prompt_pages(long_beams) -> None:
    llm, out, peak = long_beams
    bm = llm.llm_engine.block_manager
    one_sequence = math.ceil((len(LONG_PROMPT) + LONG_PARAMS.max_tokens) / bm.block_size)
    assert len(out.sequences) == 8
    # 8 private copies would take 8 x 20 blocks; shared prompt pages keep the peak near one sequence
    assert 0 < peak < 2 * one_sequence + 8, peak
    assert bm.num_free_blocks == bm.num_blocks  # every block free once the search is over


def test_abort_frees_every_block(long_beams) -> None:
    llm, _, _ = long_beams
    engine = llm.llm_engine
    step, calls = engine.step, []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the search
        return step()

    engine.step = interrupted_step
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.beam_search([PROMPTS[1]], BeamSearchParams(4, 8), use_tqdm=False)
    finally:
        del engine.step
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.step()  # the aborted requests' final outputs are flushed; the engine goes on
    assert not engine.has_unfinished_requests()


@pytest.mark.slow
def test_preemption_leaves_beams_unchanged(llama_path: str, long_beams) -> None:
    _, expected, _ = long_beams
    # 24 blocks: fewer than the 8 beams (31 at their peak) or the prompt's chunked prefill and a growing
    # concurrent request need together, so requests wait and the newest running one is preempted
    llm = LLM(llama_path, dtype="float32", max_model_len=384, num_kv_blocks=24, block_size=16, max_num_batched_tokens=64)
    engine = llm.llm_engine
    engine.add_request("other", prompts_of_lengths([100], seed=5)[0],
                       SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
    [out] = llm.beam_search([LONG_PROMPT], LONG_PARAMS, use_tqdm=False)
    assert engine.get_stats().num_preemptions_total > 0
    assert [(s.tokens, s.score) for s in out.sequences] == [(s.tokens, pytest.approx(s.score, abs=1e-5))
                                                             for s in expected.sequences]
    engine.abort_request("other")
    engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_beam_search_refusals(long_beams) -> None:
    llm, _, _ = long_beams
    with pytest.raises(SamplingParamsError, match="beam_width"):
        BeamSearchParams(0, 8)
    with pytest.raises(SamplingParamsError, match="early_stopping"):
        BeamSearchParams(2, 8, early_stopping="sometimes")
    with pytest.raises(SamplingParamsError, match="temperature"):
        BeamSearchParams(2, 8, temperature=0.7)
    for penalty in (2000.0, -2000.0):  # num_tokens ** penalty overflowed, or underflowed to 0 (fuzzing the API)
        with pytest.raises(SamplingParamsError, match="length_penalty"):
            BeamSearchParams(2, 8, length_penalty=penalty)
    assert BeamSearchParams(2, 8, length_penalty=-32.0).length_penalty == -32.0
    with pytest.raises(RequestError, match="max_tokens") as e:
        llm.beam_search([LONG_PROMPT], BeamSearchParams(2, 400), use_tqdm=False)
    assert e.value.param == "max_tokens"
    # wider than max_num_seqs: its beams wait their turn, as vLLM's (the same beams as a wide enough engine)
    small = LLM(llm.llm_engine.config.model, dtype="float32", max_num_seqs=4, num_kv_blocks=64, max_model_len=256)
    [narrow] = small.beam_search([PROMPTS[0]], BeamSearchParams(8, 4), use_tqdm=False)
    [wide] = llm.beam_search([PROMPTS[0]], BeamSearchParams(8, 4), use_tqdm=False)
    assert [s.tokens for s in narrow.sequences] == [s.tokens for s in wide.sequences]


def test_best_of_keeps_highest_cumulative_logprob(long_beams) -> None:
    llm, _, _ = long_beams
    sampling = {"temperature": 1.0, "seed": 11, "max_tokens": 6, "ignore_eos": True}
    [all_five] = llm.generate([PROMPTS[0]], SamplingParams(n=5, logprobs=0, **sampling), use_tqdm=False)
    [best] = llm.generate([PROMPTS[0]], SamplingParams(n=2, best_of=5, **sampling), use_tqdm=False)
    ranked = sorted(all_five.outputs, key=lambda s: -s.cumulative_logprob)
    assert len({tuple(s.token_ids) for s in all_five.outputs}) > 2  # the samples differ: choosing matters
    assert [s.token_ids for s in best.outputs] == [s.token_ids for s in ranked[:2]]
    assert [s.index for s in best.outputs] == [0, 1]
    assert all(s.logprobs is None for s in best.outputs)  # not asked for
    with pytest.raises(SamplingParamsError, match="best_of") as e:
        SamplingParams(n=3, best_of=2)
    assert e.value.param == "best_of"


def test_prompt_forms(long_beams) -> None:
    """Text, TokensPrompt and token-id prompts, one or a list, as LLM.generate takes them."""
    llm, _, _ = long_beams
    ids = llm.get_tokenizer().encode("The quick brown fox")
    params = BeamSearchParams(2, 3, ignore_eos=True)
    by_text = llm.beam_search("The quick brown fox", params, use_tqdm=False)
    by_ids = llm.beam_search([{"prompt_token_ids": ids}, ids], params, use_tqdm=False)
    assert len(by_text) == 1 and len(by_ids) == 2
    for out in by_text + by_ids:
        assert [s.tokens for s in out.sequences] == [s.tokens for s in by_text[0].sequences]
        assert all(s.tokens[: len(ids)] == ids and len(s.output_token_ids) == 3 for s in out.sequences)
    with pytest.raises(RequestError) as e:
        llm.beam_search([ids, {"prompt": 3}], params, use_tqdm=False)
    assert e.value.param == "prompts[1].prompt"
