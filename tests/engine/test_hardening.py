"""No request that SamplingParams and add_request accept can make the sampler, scheduler or
engine loop raise (issue 21): int64 seeds, huge top_k, a pool smaller than max_model_len, a
request that fails inside step(), and a bounded fuzz of every sampling field."""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager
from engine.config import CPU_STEP_TOKENS, ConfigError
from engine.errors import RequestError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParamsError, mix_seed

VOCAB = 512  # tests/conftest.py's tiny checkpoints
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(tiny_llama: str, request) -> LLMEngine:
    return LLM(tiny_llama, max_model_len=MAX_MODEL_LEN, max_num_seqs=8, async_scheduling=request.param).llm_engine


def run(engine: LLMEngine, max_steps: int = 2000) -> dict[str, RequestOutput]:
    """Step until idle; the final output of every request that finished."""
    final: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return final
        final.update({o.request_id: o for o in engine.step() if o.finished})
    raise AssertionError("the engine did not become idle")


def assert_idle(engine: LLMEngine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)


def tokens(out: RequestOutput) -> list[int]:
    return out.outputs[0].token_ids


PROMPT = [5, 6, 7, 8, 9]


# ---- 1, 2: SamplingParams accepts only what the sampler can represent ----

@pytest.mark.parametrize("kwargs,param", [
    (dict(seed=2**64 + 1), "seed"),
    (dict(seed=2**63), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=10**5000), "seed"),  # no repr of it either (Python's 4300-digit limit)
    (dict(seed=1.5), "seed"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=math.inf), "temperature"),
    (dict(temperature=10**400), "temperature"),
    (dict(temperature="0.5"), "temperature"),
    (dict(top_p=math.nan), "top_p"),
    (dict(top_k="5"), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(min_p=None), "min_p"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"),
    (dict(repetition_penalty=math.inf), "repetition_penalty"),
    (dict(presence_penalty=math.nan), "presence_penalty"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(max_tokens="16"), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(n=True), "n"),
    (dict(n=2.0), "n"),
    (dict(logprobs=True), "logprobs"),
    (dict(stop=5), "stop"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=[-(2**70)]), "stop_token_ids"),
    (dict(stop_token_ids=["2"]), "stop_token_ids"),
    (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_unrepresentable_values_are_errors_naming_the_field(kwargs: dict, param: str) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and str(e.value).startswith(f"{param}: ")


def test_every_int64_seed_works_and_keeps_its_properties(engine: LLMEngine) -> None:
    seeds = [2**62, -(2**63), 2**63 - 1, 2**44, -1, 0]
    sampled = dict(temperature=1.0, max_tokens=12, ignore_eos=True)
    for i, seed in enumerate(seeds):  # one batch, with an unseeded neighbour
        engine.add_request(f"s{i}", PROMPT, SamplingParams(seed=seed, **sampled))
    engine.add_request("noise", PROMPT, SamplingParams(**sampled))
    batched = run(engine)
    assert all(len(tokens(batched[f"s{i}"])) == 12 for i in range(len(seeds)))
    engine.add_request("alone", PROMPT, SamplingParams(seed=2**62, **sampled))
    assert tokens(run(engine)["alone"]) == tokens(batched["s0"])  # batch mates do not change the text
    # distinct seeds give distinct texts, the two extremes of int64 included
    assert len({tuple(tokens(o)) for rid, o in batched.items() if rid != "noise"}) == len(seeds)
    engine.add_request("pair", PROMPT, SamplingParams(seed=2**62, n=2, **sampled))
    pair = run(engine)["pair"].outputs
    assert pair[0].token_ids != pair[1].token_ids  # parallel samples of one seed differ
    assert_idle(engine)


def test_mix_seed_range_and_spread() -> None:
    mixed = {mix_seed(s, p) for s in (-(2**63), -1, 0, 1, 2**62, 2**63 - 1) for p in range(50)}
    assert len(mixed) == 300 and all(0 <= m < 2**63 for m in mixed)
    assert mix_seed(5, 1) != mix_seed(6, 0)  # the old `seed + index` scheme had this collide


def test_top_k_beyond_the_vocabulary_means_off(engine: LLMEngine) -> None:
    sampled = dict(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    engine.add_request("off", PROMPT, SamplingParams(top_k=0, **sampled))
    reference = tokens(run(engine)["off"])
    engine.add_request("huge", PROMPT, SamplingParams(top_k=1180591620717411303424, **sampled))
    engine.add_request("five", PROMPT, SamplingParams(top_k=5, **sampled))
    engine.add_request("vocab", PROMPT, SamplingParams(top_k=VOCAB + 1, **sampled))
    out = run(engine)
    assert tokens(out["huge"]) == reference and tokens(out["vocab"]) == reference
    assert len(tokens(out["five"])) == 10
    assert_idle(engine)


def test_stop_token_ids_outside_the_vocabulary_are_refused(engine: LLMEngine) -> None:
    with pytest.raises(RequestError) as e:
        engine.add_request("bad", PROMPT, SamplingParams(stop_token_ids=[VOCAB], min_tokens=2))
    assert e.value.param == "stop_token_ids"
    assert_idle(engine)


# ---- 3: a KV pool that cannot hold one max_model_len sequence ----

def test_start_up_refuses_a_pool_smaller_than_max_model_len(tiny_llama: str) -> None:
    with pytest.raises(ConfigError) as e:
        LLM(tiny_llama, num_kv_blocks=6, block_size=16, max_model_len=128)
    assert e.value.param == "max_model_len"
    assert "96" in str(e.value)  # the largest length that fits
    assert all(k in str(e.value) for k in ("num_kv_blocks", "kv_cache_memory_gib", "gpu_memory_utilization"))
    LLM(tiny_llama, num_kv_blocks=6, block_size=16, max_model_len=96)  # exactly full is fine


def set_pool(engine: LLMEngine, num_blocks: int) -> int:
    """Swap in a fresh page pool of num_blocks (at most the runner's KV tensors, which cover its
    block ids; fresh, so no prefix-cache entry outlives the pages it names); the old size."""
    old = engine.block_manager.num_blocks
    engine.block_manager = engine.scheduler.block_manager = BlockManager(
        num_blocks, engine.config.block_size, engine.config.enable_prefix_caching)
    return old


def test_a_request_that_can_never_fit_fails_alone(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    original = set_pool(engine, 3)  # 48 tokens
    try:
        with pytest.raises(RequestError) as e:  # refused at the door when it can tell
            engine.add_request("big", list(range(3, 33)), SamplingParams(max_tokens=30, ignore_eos=True))
        assert e.value.param == "max_tokens"
        assert_idle(engine)
        # The scheduler's own net, for what validation lets through: the sequence outgrows the
        # whole pool while running, is preempted, then can never be scheduled again.
        monkeypatch.setattr(engine.input_processor, "validate", lambda token_ids, params: None)
        engine.add_request("big", list(range(3, 33)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
        engine.add_request("small", PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        out = run(engine)
        assert isinstance(out["big"].error, RequestError) and out["big"].error.param == "max_tokens"
        assert out["big"].outputs[0].finish_reason == "abort"
        assert out["small"].error is None and len(tokens(out["small"])) == 4
        assert_idle(engine)
    finally:
        set_pool(engine, original)
    engine.add_request("after", PROMPT, SamplingParams(temperature=0, max_tokens=3))
    assert len(tokens(run(engine)["after"])) == 3


def test_parallel_samples_that_fit_only_one_at_a_time_complete(engine: LLMEngine) -> None:
    original = set_pool(engine, 4)  # 64 tokens: one sample of 40 fits, four together do not
    try:
        params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
        engine.add_request("n4", list(range(3, 19)), params)
        out = run(engine)["n4"]
        assert out.error is None and [len(o.token_ids) for o in out.outputs] == [24] * 4
        assert_idle(engine)
    finally:
        set_pool(engine, original)


# ---- 4: a failure inside step() that belongs to one request ----

class BrokenDetokenizer:
    def add_tokens(self, token_ids: list[int]) -> str:
        raise TypeError("detokenizer exploded")

    def flush(self) -> str:
        return ""


def test_a_request_that_raises_inside_step_fails_alone(engine: LLMEngine) -> None:
    greedy = dict(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request("reference", PROMPT, SamplingParams(**greedy))
    reference = tokens(run(engine)["reference"])
    engine.add_request("good", PROMPT, SamplingParams(**greedy))
    engine.add_request("bad", [9, 8, 7], SamplingParams(n=2, **greedy))
    for sample in engine.requests["bad"].samples:
        sample.detokenizer = BrokenDetokenizer()
    out = run(engine)
    assert isinstance(out["bad"].error, TypeError)
    assert [o.finish_reason for o in out["bad"].outputs] == ["abort", "abort"]
    assert out["good"].error is None and tokens(out["good"]) == reference
    assert_idle(engine)


# ---- 5: fuzz: every field from wide ranges, one batch ----

WILD_INTS = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70),
                      st.sampled_from([2**62, -(2**63), 2**63 - 1, 2**63, 2**64 + 1, 10**21]))
WILD_FLOATS = st.one_of(st.floats(-3.0, 3.0), st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([0.0, 1e-45, 1e-30, 1e-7, 1e30, 1e39, 3.4e38, 1.0, 2.0]))
OTHER_TYPES = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(0, 3), max_size=2))
FIELD_VALUES = {
    "n": st.one_of(st.integers(1, 3), WILD_INTS),
    "temperature": WILD_FLOATS, "top_p": WILD_FLOATS, "min_p": WILD_FLOATS, "presence_penalty": WILD_FLOATS,
    "frequency_penalty": WILD_FLOATS, "repetition_penalty": WILD_FLOATS,
    "top_k": WILD_INTS, "seed": WILD_INTS, "min_tokens": WILD_INTS, "logprobs": st.one_of(st.integers(0, 20), WILD_INTS),
    "max_tokens": st.one_of(st.none(), st.integers(1, 12), WILD_INTS),
    "prompt_logprobs": st.one_of(st.none(), st.integers(0, 20), WILD_INTS),
    "stop": st.one_of(st.lists(st.text(min_size=1, max_size=3), max_size=3), st.text(max_size=3)),
    "stop_token_ids": st.one_of(st.lists(WILD_INTS, max_size=3), st.just(list(range(VOCAB)))),
    "ignore_eos": st.booleans(), "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
}


@st.composite
def sampling_kwargs(draw: st.DrawFn) -> dict:
    fields = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), unique=True, max_size=8))
    kwargs = {}
    for name in fields:
        kwargs[name] = draw(st.one_of(FIELD_VALUES[name], OTHER_TYPES) if draw(st.integers(0, 9)) == 0
                            else FIELD_VALUES[name])
    return kwargs


# a batch's sequences x tokens it may generate: at max_num_seqs 8 a step, inside run()'s 2,000 steps
FUZZ_SEQUENCE_TOKENS = 12_000


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.tuples(sampling_kwargs(), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)),
                      min_size=1, max_size=4))
@example(batch=[({"n": 2376}, [1])])  # CI, 2026-12-04: 4,722 steps, over run()'s 2,000
def test_fuzz_sampling_params_never_break_a_step(engine: LLMEngine, batch: list[tuple[dict, list[int]]]) -> None:
    added, work = [], 0
    for i, (kwargs, prompt) in enumerate(batch):
        try:
            params = SamplingParams(**kwargs)
        except SamplingParamsError as e:
            assert e.param in kwargs
            continue
        cost = (params.best_of or params.n) * min(params.max_tokens or MAX_MODEL_LEN, MAX_MODEL_LEN)
        if work + cost > FUZZ_SEQUENCE_TOKENS:
            continue  # valid, but too long for run()'s steps: n=2376 took 4,722 (large n: test_offline_fuzz_num_seqs)
        try:
            engine.add_request(f"fuzz{i}", prompt, params)
        except RequestError:
            continue
        added.append(f"fuzz{i}")
        work += cost
    out = run(engine)
    assert sorted(out) == sorted(added) and all(o.error is None for o in out.values())
    assert_idle(engine)


def test_cpu_steps_stay_short_by_default(tiny_llama: str) -> None:
    """Unset, the step budget on CPU is CPU_STEP_TOKENS: a 1,000-token prompt prefills in two steps. One step of
    8,191 prompt tokens took the served embedded model over the 60 s engine_hang_timeout_s, and the server
    took the engine for hung (found by fuzzing the API)."""
    engine = LLM(tiny_llama).llm_engine
    assert engine.scheduler.max_num_batched_tokens == CPU_STEP_TOKENS == 512
    engine.add_request("long", [5 + i % 400 for i in range(1000)], SamplingParams(max_tokens=1))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    assert steps >= 2
    assert_idle(engine)
