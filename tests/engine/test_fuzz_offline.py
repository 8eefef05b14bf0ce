"""The offline API as a vLLM user porting a script drives it: each test is a defect found by fuzzing
LLM.generate/chat/beam_search with vLLM's signatures and SamplingParams (one LLM for the module)."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from engine import LLM, SamplingParams
from engine.beam_search import BeamSearchParams
from engine.errors import RequestError
from engine.lora.request import LoRARequest

PROMPT = [5, 6, 7, 8]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    return LLM(tiny_llama, max_model_len=64, max_num_seqs=8)


def token_ids(outputs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_chat_takes_lora_request_where_vllm_does(llm: LLM) -> None:
    """vLLM's LLM.chat(messages, sampling_params, use_tqdm, lora_request, ...): the adapter given
    positionally was taken as add_generation_prompt and the base model answered, silently."""
    conversation = [{"role": "user", "content": "the cat"}]
    adapter = LoRARequest("missing", 1, "/nonexistent/adapter")
    with pytest.raises(RequestError) as err:  # this engine has no LoRA: the adapter is refused, not dropped
        llm.chat(conversation, GREEDY, False, adapter)
    assert err.value.param == "lora_request"
    with pytest.raises(RequestError) as err:
        llm.chat(conversation, GREEDY, use_tqdm=False, lora_request=adapter)
    assert err.value.param == "lora_request"
    assert token_ids(llm.chat(conversation, GREEDY, False, None)) == token_ids(
        llm.chat(conversation, GREEDY, use_tqdm=False, add_generation_prompt=True))


def test_interrupted_generate_leaves_nothing_running(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in a notebook mid-generate: the batch kept running inside the next generate() call
    (its outputs thrown away), as beam_search's engine_step already prevents."""
    engine = llm.llm_engine
    reference = token_ids(llm.generate([PROMPT], GREEDY, use_tqdm=False))
    real_step, calls = engine.step, []

    def interrupted_step():
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(engine, "step", interrupted_step)
    long = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([PROMPT] * 4, long, use_tqdm=False)
    monkeypatch.setattr(engine, "step", real_step)
    assert not engine.has_unfinished_requests()
    assert token_ids(llm.generate([PROMPT], GREEDY, use_tqdm=False)) == reference


def test_beam_search_takes_lora_request_where_vllm_does(llm: LLM) -> None:
    """vLLM's LLM.beam_search(prompts, params, lora_request, use_tqdm): the adapter given positionally
    was taken as use_tqdm and the base model searched, silently. Beams run on the base model's steps,
    so an adapter is refused (as the server's use_beam_search does), not dropped."""
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    adapter = LoRARequest("adapter", 1, "/nonexistent/adapter")
    for call in (lambda: llm.beam_search([PROMPT], params, adapter),
                 lambda: llm.beam_search([PROMPT], params, lora_request=[adapter])):
        with pytest.raises(RequestError) as err:
            call()
        assert err.value.param == "lora_request"
    [out] = llm.beam_search([PROMPT], params, None, False)
    assert len(out.sequences) == 2


def test_detokenize_false_names_no_logprob_token(llm: LLM) -> None:
    """vLLM's detokenize=False: no text and no Logprob.decoded_token (sample and prompt logprobs); the
    tokenizer decoded every top-k token anyway, the CPU cost detokenize=False is for."""
    params = SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=2, detokenize=False)
    [out] = llm.generate([PROMPT], params, use_tqdm=False)
    assert out.outputs[0].text == ""
    entries = [e for e in out.outputs[0].logprobs + out.prompt_logprobs[1:]]
    assert entries and all(lp.decoded_token is None for e in entries for lp in e.values())
    [named] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3, logprobs=2, prompt_logprobs=2),
                           use_tqdm=False)
    assert all(lp.decoded_token is not None for e in named.outputs[0].logprobs for lp in e.values())


def test_generate_from_several_threads_returns_each_its_own(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call's step loop kept only its own requests' outputs and dropped the others': generate()
    from two threads at once hung both forever."""
    prompts = [PROMPT, [9, 10, 11]]
    expected = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    results: dict[int, list[list[int]]] = {}
    engine, real_step = llm.llm_engine, llm.llm_engine.step
    both_added, stepped = threading.Barrier(2, timeout=2), threading.local()

    def step_once_both_added():  # the calls overlap for sure: neither steps before both added their requests
        if not getattr(stepped, "once", False):
            stepped.once = True
            try:
                both_added.wait()
            except threading.BrokenBarrierError:
                pass  # calls that run one after another
        return real_step()

    monkeypatch.setattr(engine, "step", step_once_both_added)

    def call(k: int) -> None:
        results[k] = token_ids(llm.generate(prompts[k:] + prompts[:k], GREEDY, use_tqdm=False))

    threads = [threading.Thread(target=call, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert results == {0: expected, 1: expected[::-1]}
    assert not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("field,value,meaning", [
    ("top_k", -1, "off"),  # vLLM's documented "all tokens": every token was masked, token 0 came out
    ("stop", "\n\n", ["\n\n"]),  # a string was matched character by character
])
def test_sampling_params_changed_after_construction_mean_what_vllm_says(llm: LLM, field: str, value: object,
                                                                        meaning: object) -> None:
    """vLLM scripts set fields on a SamplingParams after building it; they reached the engine unchecked
    and un-normalized (checks and normalization ran only in __post_init__)."""
    params = SamplingParams(seed=3, max_tokens=6, ignore_eos=True)
    setattr(params, field, value)
    expected = SamplingParams(seed=3, max_tokens=6, ignore_eos=True, **({} if meaning == "off" else {field: meaning}))
    assert token_ids(llm.generate([PROMPT], params, use_tqdm=False)) == token_ids(
        llm.generate([PROMPT], expected, use_tqdm=False))


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("logprobs", 1000), ("n", 0)])
def test_sampling_params_made_invalid_after_construction_are_refused(llm: LLM, field: str, value: object) -> None:
    """max_tokens=0 ran to the default length, temperature=-1 ran greedy, logprobs=1000 returned 1000 per token."""
    params = SamplingParams(max_tokens=4)
    setattr(params, field, value)
    with pytest.raises(ValueError) as err:
        llm.generate([PROMPT, PROMPT], [SamplingParams(max_tokens=4), params], use_tqdm=False)
    assert getattr(err.value, "param", None) == field
    assert not llm.llm_engine.has_unfinished_requests()


def test_beam_search_params_made_invalid_after_construction_are_refused(llm: LLM) -> None:
    params = BeamSearchParams(beam_width=2, max_tokens=3)
    params.beam_width = 0
    with pytest.raises(ValueError) as err:
        llm.beam_search([PROMPT], params)
    assert getattr(err.value, "param", None) == "beam_width"


def test_a_refused_prompt_of_a_batch_is_named_by_its_index(llm: LLM) -> None:
    """One prompt past max_model_len among many: the error said "the prompt has 70 tokens" but not which
    one; the batch is refused whole (as vLLM) and the engine is left idle."""
    prompts = [PROMPT, PROMPT, list(range(3, 73)), PROMPT]
    with pytest.raises(RequestError) as err:
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert err.value.param == "prompt" and "prompts[2]" in str(err.value)
    with pytest.raises(RequestError) as err:
        llm.chat([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b " * 80}]], GREEDY, use_tqdm=False)
    assert "messages[1]" in str(err.value)
    assert not llm.llm_engine.has_unfinished_requests()


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm: LLM) -> None:
    """vLLM's SamplingParams(truncate_prompt_tokens=k): a TypeError (no such field), so a ported script
    could not run at all."""
    long_prompt = list(range(3, 33))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=5)
    text = llm.get_tokenizer().decode(long_prompt)
    [by_ids, by_text] = llm.generate([long_prompt, text], params, use_tqdm=False)
    assert by_ids.prompt_token_ids == long_prompt[-5:]
    assert by_text.prompt_token_ids == llm.get_tokenizer().encode(text)[-5:]
    plain = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert token_ids([by_ids]) == token_ids(llm.generate([long_prompt[-5:]], plain, use_tqdm=False))
    assert token_ids(llm.generate([PROMPT], dataclasses.replace(plain, truncate_prompt_tokens=50), use_tqdm=False)) == \
        token_ids(llm.generate([PROMPT], plain, use_tqdm=False))  # shorter than k: unchanged
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError) as err:
            SamplingParams(truncate_prompt_tokens=bad)
        assert err.value.param == "truncate_prompt_tokens"
    with pytest.raises(RequestError) as err:  # past the context: vLLM's refusal
        llm.generate([PROMPT], dataclasses.replace(plain, truncate_prompt_tokens=65), use_tqdm=False)
    assert err.value.param == "truncate_prompt_tokens"
    # -1: max_model_len tokens, which leave no room to generate: the prompt's own refusal
    with pytest.raises(RequestError) as err:
        llm.generate([list(range(3, 83))], dataclasses.replace(plain, truncate_prompt_tokens=-1), use_tqdm=False)
    assert err.value.param == "prompt" and "64 tokens" in str(err.value)


def test_sampling_params_clone() -> None:
    """vLLM's SamplingParams.clone(): an AttributeError, so a ported script died before generating."""
    params = SamplingParams(temperature=0, max_tokens=4, stop=["x"], stop_token_ids=[3])
    copy = params.clone()
    assert copy == params and copy is not params
    copy.stop.append("y")
    copy.stop_token_ids.append(4)
    assert params.stop == ["x"] and params.stop_token_ids == [3]


def test_a_lora_int_id_names_one_adapter(tiny_llama: str, tmp_path) -> None:
    """LoRARequest("b", 1, dir_b) after LoRARequest("a", 1, dir_a): the core caches adapters (and the prefix
    cache keys pages) by lora_int_id alone, so b's requests silently ran adapter a. Refused, naming the id;
    the same directory under another name is the same adapter and runs."""
    from tests.engine.test_lora import write_adapter

    dirs = [write_adapter(tiny_llama, str(tmp_path / f"a{i}"), 4, 8, ["q_proj", "v_proj"], False, i) for i in (1, 2)]
    llm = LLM(tiny_llama, device="cpu", max_model_len=64, enable_lora=True, max_loras=2)

    def run(lora: LoRARequest) -> list[list[int]]:
        return token_ids(llm.generate([PROMPT], GREEDY, use_tqdm=False, lora_request=lora))

    first, second = run(LoRARequest("a", 1, dirs[0])), run(LoRARequest("b", 2, dirs[1]))
    assert first != second
    with pytest.raises(RequestError) as err:
        run(LoRARequest("b", 1, dirs[1]))
    assert err.value.param == "lora_request.lora_int_id" and "'a'" in str(err.value)
    with pytest.raises(RequestError):  # two adapters under one new id in one batch: refused whole
        llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False,
                     lora_request=[LoRARequest("a", 3, dirs[0]), LoRARequest("b", 3, dirs[1])])
    assert not llm.llm_engine.has_unfinished_requests()
    assert run(LoRARequest("a-again", 1, dirs[0] + "/")) == first
    # vLLM's RequestOutput.lora_request: which adapter each output ran with (an AttributeError before)
    outputs = llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False, lora_request=[None, LoRARequest("b", 2, dirs[1])])
    assert [o.lora_request for o in outputs] == [None, LoRARequest("b", 2, dirs[1])]
    assert run(LoRARequest("b", 2, dirs[1])) == second


def test_generate_takes_vllm_priority(llm: LLM) -> None:
    """vLLM's LLM.generate(..., priority=[...]): a TypeError, so a ported script could not run. Requests run
    first come, first served (vLLM's default policy, which refuses a non-zero priority too)."""
    expected = token_ids(llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False))
    assert token_ids(llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False, priority=[0, 0])) == expected
    for priority, field in (([0, 1], "priority[1]"), ([0], "priority"), (0, "priority")):
        with pytest.raises(RequestError) as err:
            llm.generate([PROMPT, PROMPT], GREEDY, use_tqdm=False, priority=priority)
        assert err.value.param == field
    assert not llm.llm_engine.has_unfinished_requests()
