"""Scheduler + BlockManager without a model: a fake runner samples a token that depends only on
its position, so preemption, chunking, prefix caching and async placeholders must give the same
tokens as a roomy synchronous run, the loop closes in update_from_output, and every block is free
at the end."""
from __future__ import annotations

import dataclasses
import pickle
import random
from collections import defaultdict, deque

import pytest

from engine.block_manager import BlockManager
from engine.core_messages import EngineCoreOutput, TokenLogprobs
from engine.outputs import (
    ModelRunnerOutput, PromptLogprobsChunk, RequestMetrics, RequestSamplingParams, SchedulerOutput,
)
from engine.sampling_params import SamplingParams, mix_seed
from engine.scheduler import Scheduler
from engine.sequence import Request, Sequence, SequenceStatus

EOS = 2
BLOCK = 4


def token_at(position: int) -> int:
    """What the fake model samples at a position: never EOS, the same after a recompute."""
    return 10 + position % 37


def make_request(rid: str, prompt: list[int], max_tokens: int = 6, **params) -> Request:
    sp = SamplingParams(max_tokens=max_tokens, **params)
    req = Request(rid, None, list(prompt), sp, RequestMetrics(0.0), max_tokens)
    for i in range(sp.n):
        req.seqs.append(Sequence(rid if sp.n == 1 else f"{rid}#{i}", req, i, list(prompt), len(prompt)))
    return req


def make_scheduler(num_blocks: int = 64, budget: int = 64, async_scheduling: bool = False,
                   prefix: bool = False, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK, prefix), max_num_seqs, budget, [EOS],
                     async_scheduling=async_scheduling, max_model_len=512)


def schedule_and_run(sched: Scheduler, sample=token_at) -> tuple[SchedulerOutput, list[Sequence], ModelRunnerOutput]:
    """schedule(), and what a model would return: a sequence samples when schedule() gave it a
    placeholder for this step, at position num_computed_tokens (the next token's index)."""
    before = {q.seq_id: q.num_placeholders for q in [*sched.running, *sched.waiting]}
    so, scheduled = sched.schedule()
    sampling = [q for q in scheduled if q.num_placeholders > before.get(q.seq_id, 0)]
    return so, scheduled, ModelRunnerOutput([q.seq_id for q in sampling], [sample(q.num_computed_tokens) for q in sampling])


def drive(sched: Scheduler, requests: list[Request], max_in_flight: int = 1, sample=token_at,
          on_step=None) -> dict[str, list[EngineCoreOutput]]:
    """The engine's loop: schedule and submit while a slot is free, collect the oldest batch."""
    for req in requests:
        for seq in req.seqs:
            sched.add(seq)
    outputs: dict[str, list[EngineCoreOutput]] = defaultdict(list)
    in_flight: deque = deque()
    for step in range(10_000):
        if not (sched.has_unfinished() or in_flight):
            return outputs
        if on_step is not None:
            on_step(step, sched)
        submitted = False
        if len(in_flight) < max_in_flight:
            so, scheduled, result = schedule_and_run(sched, sample)
            if so.num_scheduled_tokens:
                in_flight.append((so, scheduled, result))
                submitted = True
        if in_flight and (len(in_flight) == max_in_flight or not submitted):
            so, scheduled, result = in_flight.popleft()
            for out in sched.update_from_output(so, scheduled, result):
                outputs[f"{out.request_id}#{out.index}"].append(out)
    raise AssertionError("the scheduler did not finish")


def assert_all_free(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


def tokens_of(outs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


PROMPTS = [list(range(3, 3 + n)) for n in (1, 5, 9, 17, 30)]


def reference(max_tokens: int = 6) -> dict[str, list[int]]:
    sched = make_scheduler(num_blocks=256, budget=4096)
    outs = drive(sched, [make_request(f"r{i}", p, max_tokens) for i, p in enumerate(PROMPTS)])
    return {k: tokens_of(v) for k, v in outs.items()}


def test_deltas_length_and_free() -> None:
    sched = make_scheduler()
    outs = drive(sched, [make_request(f"r{i}", p) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        got = outs[f"r{i}#0"]
        assert all(len(o.new_token_ids) == 1 for o in got)  # one new token per step: deltas, not copies
        assert tokens_of(got) == [token_at(len(p) + j) for j in range(6)]
        assert [o.finish_reason for o in got] == [None] * 5 + ["length"]
    assert sched.generation_tokens_total == 6 * len(PROMPTS)
    assert sched.prompt_tokens_total == sum(map(len, PROMPTS))
    assert_all_free(sched)


def test_eos_stop_tokens_and_min_tokens() -> None:
    sched = make_scheduler()
    reqs = [make_request("eos", [5, 6, 7], max_tokens=10, min_tokens=3),
            make_request("ignore", [5, 6, 7], max_tokens=4, ignore_eos=True),
            make_request("stop_id", [5, 6, 7], max_tokens=10, stop_token_ids=[EOS])]
    outs = drive(sched, reqs, sample=lambda pos: EOS)
    assert len(outs["eos#0"]) == 3 and outs["eos#0"][-1].finish_reason == "stop"  # EOS ignored under min_tokens
    assert outs["eos#0"][-1].stop_reason is None  # EOS, not a stop token
    assert [o.finish_reason for o in outs["ignore#0"]][-1] == "length" and len(outs["ignore#0"]) == 4
    assert outs["stop_id#0"][0].finish_reason == "stop" and outs["stop_id#0"][0].stop_reason == EOS
    assert_all_free(sched)


def test_context_length_finishes() -> None:
    sched = Scheduler(BlockManager(64, BLOCK, False), 4, 64, [EOS], max_model_len=8)
    outs = drive(sched, [make_request("r", [3] * 6, max_tokens=100)])
    assert len(outs["r#0"]) == 2 and outs["r#0"][-1].finish_reason == "length"
    assert_all_free(sched)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_preemption_chunking_same_tokens(async_scheduling: bool) -> None:
    ref = reference(max_tokens=12)
    # 12 blocks of 4 tokens for 5 requests of up to 42 tokens: preemption; budget 8: chunked prompts
    sched = make_scheduler(num_blocks=12, budget=8, async_scheduling=async_scheduling)
    outs = drive(sched, [make_request(f"r{i}", p, max_tokens=12) for i, p in enumerate(PROMPTS)],
                 max_in_flight=2 if async_scheduling else 1)
    assert sched.num_preemptions > 0
    assert {k: tokens_of(v) for k, v in outs.items()} == ref
    assert sched.prompt_tokens_total == sum(map(len, PROMPTS))  # a recomputed prompt is counted once (vLLM's)
    assert_all_free(sched)


def test_async_placeholders_two_in_flight() -> None:
    sched = make_scheduler(async_scheduling=True)
    seen_placeholders = []
    schedule = sched.schedule

    def spy(lane: int = 0):
        out = schedule(lane)
        seen_placeholders.extend(q.num_placeholders for q in sched.running)
        return out

    sched.schedule = spy
    outs = drive(sched, [make_request(f"r{i}", p) for i, p in enumerate(PROMPTS)], max_in_flight=2)
    assert max(seen_placeholders) == 2  # a step scheduled on a token still being sampled
    assert {k: tokens_of(v) for k, v in outs.items()} == reference()
    assert_all_free(sched)


def test_prefix_cache_hits_reported() -> None:
    sched = make_scheduler(prefix=True)
    prompt = list(range(3, 20))  # 17 tokens: 4 full blocks
    first = drive(sched, [make_request("a", prompt)])
    second = drive(sched, [make_request("b", prompt)])
    assert first["a#0"][0].num_cached_tokens == 0
    assert second["b#0"][0].num_cached_tokens == 16
    assert tokens_of(second["b#0"]) == tokens_of(first["a#0"])
    # vllm:prompt_tokens_total counts every prompt token, cached or not: a dashboard's prompt tokens/s
    # must not drop when the cache hits (hits have their own counter); n=2 is one request, one prompt
    assert sched.prompt_tokens_total == 2 * len(prompt)
    drive(sched, [make_request("c", prompt, n=2)])
    assert sched.prompt_tokens_total == 3 * len(prompt)
    assert_all_free(sched)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", range(4))
def test_abort_anywhere(async_scheduling: bool, seed: int) -> None:
    """Aborting at random steps (waiting, running, in flight, mid-prefill) frees everything and
    the aborted sample gets nothing afterwards."""
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=14, budget=8, async_scheduling=async_scheduling)
    reqs = [make_request(f"r{i}", p, n=2 if i % 2 else 1) for i, p in enumerate(PROMPTS)]
    aborted: dict[str, int] = {}  # seq id -> tokens it had when aborted

    def maybe_abort(step: int, s: Scheduler) -> None:
        live = [q for r in reqs for q in r.seqs if not q.is_finished]
        if live and rng.random() < 0.3:
            seq = rng.choice(live)
            aborted[seq.seq_id] = seq.num_output_tokens
            seq.finish_reason = "abort"
            s.finish([seq])

    outs = drive(sched, reqs, max_in_flight=2 if async_scheduling else 1, on_step=maybe_abort)
    assert aborted
    for req in reqs:
        for seq in req.seqs:
            assert seq.status == SequenceStatus.FINISHED
            got = outs.get(f"{req.request_id}#{seq.index}", [])
            if seq.seq_id in aborted:
                assert len(tokens_of(got)) == aborted[seq.seq_id]
                assert all(o.finish_reason is None for o in got)
    assert_all_free(sched)


def test_prompt_logprobs_counted_by_scheduler() -> None:
    """Prompt logprob chunks pass through as typed entries and stop being asked once complete."""
    sched = make_scheduler(budget=8)
    req = make_request("p", list(range(3, 23)), max_tokens=2, prompt_logprobs=1)
    seq = req.seqs[0]
    sched.add(seq)
    chunks = []
    while sched.has_unfinished():
        so, scheduled, result = schedule_and_run(sched)
        assert (so.scheduled_new_reqs[0].sampling_params.prompt_logprobs == 1) if so.scheduled_new_reqs else True
        start = seq.num_computed_tokens - so.num_scheduled_tokens["p"]
        last = min(seq.num_computed_tokens, seq.num_prompt_tokens - 1)
        if start < last:
            result.prompt_logprobs = {"p": PromptLogprobsChunk(
                start + 1, [TokenLogprobs([t, 0], [-1.0, -0.5], 2) for t in range(start + 1, last + 1)])}
        for out in sched.update_from_output(so, scheduled, result):
            if out.new_prompt_logprobs is not None:
                first, entries = out.new_prompt_logprobs
                chunks.append(first)
                assert entries[0].rank == 2 and entries[0].token_ids[1] == 0
    assert chunks == [1, 9, 17]
    assert req.num_prompt_logprobs == 20 and not seq.needs_prompt_logprobs
    assert_all_free(sched)


def test_new_requests_carry_typed_sampling_params() -> None:
    """Each sample's sampling settings reach the runners as one RequestSamplingParams (its own
    seed stream, the model's EOS ids), which pickles positionally: it crosses ranks."""
    sched = make_scheduler()
    req = make_request("s", [5, 6, 7], n=2, seed=42, temperature=0.5, top_k=3, logprobs=2, min_tokens=1,
                       stop_token_ids=[9], repetition_penalty=1.2)
    for seq in req.seqs:
        sched.add(seq)
    so, _ = sched.schedule()
    params = [new.sampling_params for new in so.scheduled_new_reqs]
    assert all(type(p) is RequestSamplingParams for p in params)
    assert [p.seed for p in params] == [mix_seed(42, 0), mix_seed(42, 1)]
    first = params[0]
    assert (first.temperature, first.top_k, first.logprobs, first.min_tokens) == (0.5, 3, 2, 1)
    assert (first.stop_token_ids, first.eos_token_ids, first.num_prompt_tokens) == ([9], [EOS], 3)
    assert first.has_penalties and first.prompt_logprobs is None
    wire = pickle.dumps(so)
    assert pickle.loads(wire).scheduled_new_reqs[0].sampling_params == first
    assert len(pickle.dumps(first)) < len(pickle.dumps(dataclasses.asdict(first))) // 2


def test_sampled_logprobs_pass_through_as_typed_entries() -> None:
    """The runner's TokenLogprobs (sampled and prompt) reach the client's output as they are, None
    where not asked."""
    sched = make_scheduler()
    with_lp, without = make_request("a", [5, 6, 7], max_tokens=1, logprobs=1), make_request("b", [5, 6], max_tokens=1)
    for req in (with_lp, without):
        sched.add(req.seqs[0])
    so, scheduled, result = schedule_and_run(sched)
    entry = TokenLogprobs([11, 12], [-0.7, -0.2], 2)
    result.logprobs = [entry if seq_id == "a" else None for seq_id in result.req_ids]
    result.prompt_logprobs = {"a": PromptLogprobsChunk(1, [TokenLogprobs([6, 9], [-1.5, -0.1], 3)])}
    assert pickle.loads(pickle.dumps(result)) == result  # the last pipeline stage pickles it to rank 0
    outs = {o.request_id: o for o in sched.update_from_output(so, scheduled, result)}
    assert outs["a"].new_logprobs == [entry] and outs["a"].new_logprobs[0] is entry
    assert outs["b"].new_logprobs is None
    assert outs["a"].new_prompt_logprobs == (1, result.prompt_logprobs["a"].entries)
    assert_all_free(sched)


def record_steps(sched: Scheduler) -> list[list[tuple[int, bool]]]:
    """Wrap sched.schedule; the returned list gets, for every step, (tokens, decoding) per scheduled
    sequence. It decodes when its prompt was computed before the step (a 1-token prompt chunk does not)."""
    steps: list[list[tuple[int, bool]]] = []
    original = sched.schedule

    def schedule(lane: int = 0):
        so, scheduled = original(lane)
        n = so.num_scheduled_tokens
        steps.append([(n[s.seq_id], s.num_computed_tokens - n[s.seq_id] >= s.num_prompt_tokens) for s in scheduled])
        return so, scheduled

    sched.schedule = schedule
    return steps


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prefill_tokens_capped_while_decoding(async_scheduling: bool) -> None:
    """max_prefill_tokens_while_decoding: a step that decodes holds at most that many prompt tokens
    (a burst of new prompts stalls the running streams for a bounded time); the first step, with
    nothing decoding, takes a whole long prompt; the tokens are those of an uncapped run."""
    ref = reference(max_tokens=12)
    sched = make_scheduler(budget=64, async_scheduling=async_scheduling)
    sched.max_prefill_tokens_while_decoding = 5
    steps = record_steps(sched)
    reqs = [make_request(f"r{i}", p, max_tokens=12) for i, p in enumerate(PROMPTS)]
    first, later = reqs[-1], reqs[:-1]  # the 30-token prompt alone, the others once it decodes

    def arrive(step: int, s: Scheduler) -> None:
        if step == 2:
            for req in later:
                s.add(req.seqs[0])

    outs = drive(sched, [first], max_in_flight=2 if async_scheduling else 1, on_step=arrive)
    assert {k: tokens_of(v) for k, v in outs.items()} == ref
    # (1-token steps, prompt tokens) of each step, as the cap counts them
    seen = [(sum(n == 1 for n, _ in step), sum(n for n, _ in step if n > 1)) for step in steps]
    assert seen[0] == (0, 30)  # nothing decodes: the whole budget
    assert all(prompt <= 5 for decode, prompt in seen if decode), seen
    assert any(prompt == 5 for decode, prompt in seen if decode), seen  # capped, not starved
    assert_all_free(sched)


def test_prefill_chunks_weighted_by_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """With prefill_context_cost, a step that decodes gives a long prompt the most tokens whose cost
    (1 + position * cost each) fits max_prefill_tokens_while_decoding: chunks shrink as the prompt
    gets deeper, each fits, and the tokens are those of an unconstrained run."""
    import engine.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "MIN_PREFILL_CHUNK", 4)
    long_prompt = [3 + i % 50 for i in range(300)]

    def run(capped: bool) -> tuple[dict[str, list[int]], list[list[tuple[int, bool]]]]:
        sched = make_scheduler(num_blocks=256, budget=64 if capped else 4096)
        if capped:
            sched.max_prefill_tokens_while_decoding, sched.prefill_context_cost = 40, 0.02
        steps = record_steps(sched)
        stream, long = make_request("stream", [5, 6, 7], max_tokens=80), make_request("long", long_prompt, max_tokens=2)

        def arrive(step: int, s: Scheduler) -> None:
            if step == 1:
                s.add(long.seqs[0])

        outs = drive(sched, [stream], on_step=arrive)
        assert_all_free(sched)
        return {k: tokens_of(v) for k, v in outs.items()}, steps

    outs, steps = run(capped=True)
    assert outs == run(capped=False)[0]
    chunks = [n for step in steps[1:] for n, decoding in step if n > 1]  # steps[0]: the stream's prompt
    assert sum(chunks) == len(long_prompt)
    start, expected = 0, []
    while start < len(long_prompt):  # the largest n with n + 0.02 * (n * start + n * (n - 1) / 2) <= 40
        n = max(m for m in range(1, 41) if m + 0.02 * (m * start + m * (m - 1) / 2) <= 40 + 1e-9)
        n = min(max(n, 4), len(long_prompt) - start)
        expected.append(n)
        start += n
    assert chunks == expected, chunks
    assert chunks[0] > 2 * chunks[-2], chunks  # deep chunks are smaller


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prefill_first_steps_carry_no_decodes(async_scheduling: bool) -> None:
    """max_prefill_tokens_while_decoding 0 (prefill first): while a prompt can start or is part-way
    through its prefill, a step holds prompts only and the running streams wait; once every prompt
    is in, steps decode. Each stream then waits once (first token to second), and the tokens are
    those of the default policy."""
    ref = reference(max_tokens=12)
    sched = make_scheduler(budget=16, async_scheduling=async_scheduling)
    sched.max_prefill_tokens_while_decoding = 0
    steps = record_steps(sched)
    reqs = [make_request(f"r{i}", p, max_tokens=12) for i, p in enumerate(PROMPTS)]
    first, later = reqs[-1], reqs[:-1]

    def arrive(step: int, s: Scheduler) -> None:
        if step == 3:
            for req in later:
                s.add(req.seqs[0])

    outs = drive(sched, [first], max_in_flight=2 if async_scheduling else 1, on_step=arrive)
    assert {k: tokens_of(v) for k, v in outs.items()} == ref
    # (decoding sequences, prompt tokens) of each step
    seen = [(sum(d for _, d in step), sum(n for n, d in step if not d)) for step in steps]
    assert not any(decode and prompt for decode, prompt in seen), seen  # never mixed
    decoding = [i for i, (decode, _) in enumerate(seen) if decode]
    prompt_steps = [i for i, (_, prompt) in enumerate(seen) if prompt]
    assert decoding and decoding[0] < prompt_steps[-1], seen  # the first stream decoded before the burst came
    # once the burst arrived, its prompts ran back to back: no decode step between two prompt steps of it
    burst = [i for i in prompt_steps if i > decoding[0]]
    assert burst == list(range(burst[0], burst[-1] + 1)), seen
    assert_all_free(sched)


def test_prefill_first_is_a_valid_setting() -> None:
    from engine.config import ConfigError, EngineConfig

    EngineConfig(model="m", max_prefill_tokens_while_decoding=0)
    with pytest.raises(ConfigError, match="max_prefill_tokens_while_decoding"):
        EngineConfig(model="m", max_prefill_tokens_while_decoding=-1)
