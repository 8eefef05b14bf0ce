"""Issue 16 throughput: under grammars with async scheduling, step t+1's forward is queued before step
t is collected and its bitmask is filled after (EngineCore._step_overlapping_bitmask), on a worker thread
while step t+2 is scheduled and prepared (EngineCore._step_pipelined). On the tiny random Llama (byte-level
tokenizer, CPU): outputs equal across the three paths (greedy and seeded), bounded JSON valid, an
unconstrained neighbour unchanged, n=4, logprobs, abort mid-stream frees the grammar, prefix caching on.
"""
from __future__ import annotations

import re
import sys
import threading

import pytest

from engine import LLM, SamplingParams
from engine.structured import StructuredOutputsParams
from tests.engine.test_structured import check_batch

# bounded grammars: a random model must reach their end, where only EOS is left
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}},
          "required": ["color", "n", "ok"], "additionalProperties": False}
REGEX = r"(yes|no), [0-9]{1,3}"
CHOICES = ["positive", "negative", "neutral"]
PROMPTS = [[5, 17, 33, 60, 7, 99, 12, 40], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25],
           [70, 71, 72], [100, 3, 200, 4, 150]]

# several engines live in this module at once; on a GPU each may take only a share of its memory
SHARE_GPU = {"gpu_memory_utilization": 0.2}


def spec(seed: int | None, n: int = 1, temperature: float = 1.0, logprobs: int | None = None,
         **so) -> SamplingParams:
    so.setdefault("disable_any_whitespace", "json" in so)
    return SamplingParams(temperature=temperature, seed=seed, n=n, max_tokens=48, logprobs=logprobs,
                          structured_outputs=StructuredOutputsParams(**so))


@pytest.fixture(scope="module")
def llm(tiny_llama: str) -> LLM:
    llm = LLM(tiny_llama, async_scheduling=True, enable_prefix_caching=True, dtype="float32", **SHARE_GPU)
    core = llm.llm_engine.engine_core
    assert core.overlap_bitmask and core.pipelined  # one process, one lane, two steps in flight
    yield llm
    llm.llm_engine.shutdown()


def count_calls(llm: LLM, method: str = "submit_sample") -> list[int]:
    """Counts calls of the executor's `method` (submit_sample: the overlapped path's) into the returned
    list; `del executor.<method>` restores it."""
    executor = llm.llm_engine.engine_core.executor
    calls = [0]
    inner = getattr(executor, method)

    def counted(so):
        calls[0] += 1
        inner(so)

    setattr(executor, method, counted)
    return calls


MODES = {"pipelined": (True, True), "overlap": (True, False), "collect_first": (False, False)}


def run(llm: LLM, prompts: list, params: list, mode: str = "pipelined") -> list:
    """mode: pipelined (the default path), overlap (GANTRY_PIPELINED_STEP=0) or collect_first."""
    core = llm.llm_engine.engine_core
    core.overlap_bitmask, core.pipelined = MODES[mode]
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        core.overlap_bitmask = core.pipelined = True
    assert not core.structured_output_manager.samples  # every matcher freed on finish
    # every forward got its sampler (a last step may be in flight)
    assert core.executor.forwarded is None and core.executor.prepared is None and core._forwarded is None
    return outputs


def tokens(outputs: list) -> list[list[list[int]]]:
    return [[s.token_ids for s in o.outputs] for o in outputs]


def check(outputs: list, kinds: list[str]) -> None:
    check_batch(outputs, [(kind, {"json": SCHEMA, "regex": REGEX, "choice": CHOICES}[kind]) for kind in kinds])


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded"])
def test_overlap_equals_collect_first(llm: LLM, seeded: bool) -> None:
    """The same tokens with the bitmask filled after the next forward is queued, on a thread or not, as
    with collect-first; every constrained sample valid; n=4; a greedy unconstrained neighbour equal to
    running alone."""
    temperature, seed = (1.0, 7) if seeded else (0.0, None)
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], free, use_tqdm=False)[0].outputs[0].token_ids
    params = [free, spec(seed, temperature=temperature, json=SCHEMA),
              spec(seed, n=4, temperature=1.0, json=SCHEMA) if seeded else spec(None, temperature=0, json=SCHEMA),
              spec(seed, temperature=temperature, regex=REGEX), spec(seed, temperature=temperature, choice=CHOICES)]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[1]]
    kinds = ["free", "json", "json", "regex", "choice"]
    calls = count_calls(llm)
    pipelined = run(llm, prompts, params)
    assert calls[0] > 0  # the overlapped path ran
    overlapped = run(llm, prompts, params, "overlap")
    before = calls[0]
    collect_first = run(llm, prompts, params, "collect_first")
    assert calls[0] == before  # ... and here it did not
    check(pipelined[1:], kinds[1:])
    assert pipelined[0].outputs[0].token_ids == alone
    assert tokens(pipelined) == tokens(overlapped) == tokens(collect_first)
    if seeded:
        assert len(pipelined[2].outputs) == 4


def test_pipelined_launch_order(llm: LLM) -> None:
    """Step t+2's inputs are prepared before step t+1's sampler is queued and its forward is launched right
    after that sampler; the bitmask is filled on the worker thread under a short thread switch interval (with
    the default 5 ms it waited for the GIL until the join), restored after; logprobs of samples that finish
    while the next step is in flight come back (the runner drops a finished request before its last sampler)."""
    runner = llm.llm_engine.engine_core.executor.runner
    manager = llm.llm_engine.engine_core.structured_output_manager
    events: list[str] = []
    threads: set[str] = set()
    intervals: set[float] = set()
    default_interval = sys.getswitchinterval()

    def logged(name: str, fn):
        def wrapper(*args):
            events.append(name)
            return fn(*args)
        return wrapper

    def fill(*args):
        threads.add(threading.current_thread().name)
        intervals.add(sys.getswitchinterval())
        return inner_fill(*args)

    inner_fill = manager._fill
    runner.prepare_forward = logged("prepare", runner.prepare_forward)
    runner.launch_forward = logged("launch", runner.launch_forward)
    runner.submit_sample = logged("sample", runner.submit_sample)
    manager._fill = fill
    try:
        params = [spec(seed, logprobs=2, json=SCHEMA) for seed in range(3)] + [
            spec(None, temperature=0, logprobs=2, regex=REGEX)]
        outputs = run(llm, [PROMPTS[k % 4] for k in range(4)], params)
    finally:
        for name in ("prepare_forward", "launch_forward", "submit_sample", "_fill"):
            vars(runner).pop(name, None)
            vars(manager).pop(name, None)
    check(outputs, ["json"] * 3 + ["regex"])
    for out in outputs:
        sample = out.outputs[0]
        assert sample.logprobs is not None and len(sample.logprobs) == len(sample.token_ids)
    order = " ".join(events)
    # collect-first and the overlap without the pipeline launch each forward right after its preparation
    assert order.count("prepare sample launch") >= 10, order
    assert threads == {"gantry-bitmask_0"}  # the worker thread (ThreadPoolExecutor names it prefix_0)
    assert max(intervals) < default_interval and sys.getswitchinterval() == default_interval


def test_abort_mid_stream_frees_the_grammar(llm: LLM) -> None:
    """A constrained request aborted while its steps are in flight leaves no matcher, no forwarded step and
    no batch behind; a constrained request still running beside it finishes valid."""
    engine = llm.llm_engine
    core = engine.engine_core
    engine.add_request("victim", PROMPTS[1], spec(None, n=2, regex=r"[a-z]{40}"))
    engine.add_request("keeper", PROMPTS[2], spec(3, json=SCHEMA))
    for _ in range(6):  # prefill and a few decode steps, two in flight
        engine.step()
    assert "victim" in core.structured_output_manager.samples and core.batch_queue
    engine.abort_request("victim")
    assert "victim" not in core.structured_output_manager.samples
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert finished["victim"].outputs[0].finish_reason == "abort"
    check([finished["keeper"]], ["json"])
    assert not core.structured_output_manager.samples and core.executor.forwarded is None and not core.batch_queue


def test_preemption_and_chunked_prefill_under_grammars(tiny_llama: str) -> None:
    """A KV pool too small for the batch (preemptions while a step is in flight) and prompts cut into
    chunks: the overlapped path gives the collect-first tokens, every regex sample valid and stopped."""
    llm = LLM(tiny_llama, **SHARE_GPU, num_kv_blocks=20, block_size=16, max_model_len=320, max_num_batched_tokens=64,
              async_scheduling=True, dtype="float32")
    try:
        prompts = [[3 + (7 * i + j) % 500 for j in range(40 + 13 * i)] for i in range(6)]
        params = [spec(11 + i, regex=r"[a-z]{30}", n=2 if i % 3 == 0 else 1) for i in range(6)]
        pipelined = run(llm, prompts, params)
        preemptions = llm.llm_engine.get_stats().num_preemptions_total
        assert preemptions > 0
        overlapped = run(llm, prompts, params, "overlap")
        collect_first = run(llm, prompts, params, "collect_first")
        for out in pipelined:
            assert all(re.fullmatch(r"[a-z]{30}", s.text) and s.finish_reason == "stop" for s in out.outputs), out
        assert tokens(pipelined) == tokens(overlapped) == tokens(collect_first)
    finally:
        llm.llm_engine.shutdown()


def test_model_vocab_past_the_tokenizer(tmp_path) -> None:
    """A model whose head is wider than its tokenizer (padding rows, as Qwen2's 152,064 over 151,665
    tokens): xgrammar gets the tokenizer's ids only (padding ids as its special tokens made every
    accept_token 20x slower), and the padding ids are never sampled under a grammar."""
    from tests.conftest import write_tiny_checkpoint, write_tiny_tokenizer

    path = write_tiny_checkpoint(str(tmp_path), "LlamaForCausalLM", tie=False, vocab_size=600)
    write_tiny_tokenizer(path, 500)
    llm = LLM(path, async_scheduling=True, dtype="float32", **SHARE_GPU)
    try:
        params = [spec(seed, temperature=2.0, regex=r"[0-9a-z ]{8,16}") for seed in range(8)]
        outputs = llm.generate([PROMPTS[k % len(PROMPTS)] for k in range(8)], params, use_tqdm=False)
        manager = llm.llm_engine.engine_core.structured_output_manager
        assert manager.grammar_vocab_size == 500
        for out in outputs:
            ids = out.outputs[0].token_ids
            assert ids and max(ids) < 500, ids
            assert re.fullmatch(r"[0-9a-z ]{8,16}", out.outputs[0].text), out.outputs[0].text
    finally:
        llm.llm_engine.shutdown()


def test_pipeline_left_when_grammars_finish(llm: LLM) -> None:
    """Once the last constrained request finishes, an unconstrained one goes on through the plain async path
    (two whole steps queued), with the tokens it gets alone."""
    executor = llm.llm_engine.engine_core.executor
    free = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], free, use_tqdm=False)[0].outputs[0].token_ids
    calls = count_calls(llm, "submit")
    try:
        outputs = run(llm, [PROMPTS[0], PROMPTS[1]], [free, spec(None, temperature=0, choice=CHOICES)])
    finally:
        del executor.submit
    check(outputs[1:], ["choice"])
    assert outputs[0].outputs[0].token_ids == alone
    assert calls[0] > 10  # most of the 40 steps after the choice ended


def test_shutdown_with_a_forward_queued(tiny_llama: str) -> None:
    """Shutting down while a forward waits for its sampler (the pipelined step leaves one) samples it and
    collects every step."""
    llm = LLM(tiny_llama, async_scheduling=True, dtype="float32", **SHARE_GPU)
    engine = llm.llm_engine
    core = engine.engine_core
    engine.add_request("a", PROMPTS[1], spec(None, regex=r"[a-z]{40}"))
    for _ in range(4):
        engine.step()
    assert core._forwarded is not None and core.executor.forwarded is not None
    engine.shutdown()
    assert core._forwarded is None and core.executor.forwarded is None
    assert not core.batch_queue and not core.executor.pending
