"""Adapters are read ahead of their first step, off the engine loop (engine/lora/prefetch.py): while a new request's
adapter is read (slowed here), the running streams keep getting a token every step; the request then runs with the
same tokens as without the wait; a read that fails fails its requests alone; offline generate with more adapters
than the host cache holds gives the tokens it gave with every read inline."""
from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import RequestError
from engine.lora import LoRARequest
from engine.lora.adapter import WEIGHTS_FILE
from tests.engine.test_lora import write_adapter
from tests.engine.test_lora_faults import Q_A, poison

PROMPT = [5, 77, 300, 12, 9, 41, 250, 8, 100]
DELAY_S = 1.0  # a read made this slow: a step that waited for it would hold every stream that long


@pytest.fixture(scope="module")
def adapters(tiny_llama: str, tmp_path_factory) -> list[str]:
    return [write_adapter(tiny_llama, str(tmp_path_factory.mktemp(f"p{i}")), 4, 8, ["q_proj", "v_proj", "down_proj"],
                          False, i) for i in range(4)]


@pytest.fixture
def slow_reads(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every adapter read sleeps DELAY_S first; returns the times reads started."""
    from engine.lora import manager

    started, real = [], manager.read_adapter

    def slow(*args, **kwargs):
        started.append(time.perf_counter())
        time.sleep(DELAY_S)
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "read_adapter", slow)
    return started


def _warm(llm: LLM, lora: LoRARequest, reads: list[float]) -> None:
    """The first steps of a process and of the LoRA path are slower (lazy set-up): run them before measuring."""
    llm.generate([PROMPT] * 2, _greedy(2), use_tqdm=False, lora_request=[None, lora])
    reads.clear()


def _llm(base: str, **kwargs) -> LLM:
    kwargs = {"max_loras": 2, "max_lora_rank": 8, **kwargs}
    if torch.cuda.is_available():  # two engines are alive at once in some tests: each takes a share of the GPU
        kwargs.setdefault("gpu_memory_utilization", 0.2)
    return LLM(base, enable_lora=True, enable_prefix_caching=False, **kwargs)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _run(engine, until: set[str], on_token=None) -> dict:
    """Step until every request in `until` finished; on_token(request_id, time) per streamed output."""
    finished = {}
    for _ in range(2000):
        for out in engine.step():
            if on_token is not None and out.outputs and out.outputs[0].token_ids:
                on_token(out.request_id, time.perf_counter())
            if out.finished:
                finished[out.request_id] = out
        if until <= set(finished):
            return finished
    raise AssertionError(f"not finished: {until - set(finished)}")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_running_stream_keeps_decoding_while_an_adapter_is_read(tiny_llama, adapters, slow_reads,
                                                                async_scheduling: bool) -> None:
    """A base-model stream decodes; a request for an adapter not in host memory arrives and its read takes DELAY_S:
    the stream's tokens keep coming (its largest gap is a fraction of DELAY_S, as steps go on), and the adapter's
    request gives the tokens it gives with no delay."""
    llm = _llm(tiny_llama, async_scheduling=async_scheduling)
    _warm(llm, LoRARequest("p3", 4, adapters[3]), slow_reads)
    lora = LoRARequest("p0", 1, adapters[0])
    engine = llm.llm_engine
    engine.stream_outputs = True
    engine.add_request("base", PROMPT, _greedy(1000))  # aborted once the adapter request finished
    times: list[float] = []
    record = lambda rid, t: times.append(t) if rid == "base" else None  # noqa: E731
    while len(times) < 3:
        for out in engine.step():
            record(out.request_id, time.perf_counter())
    engine.add_request("lora", PROMPT, _greedy(6), lora_request=lora)
    steps_before = engine.scheduler.num_steps
    finished = _run(engine, {"lora"}, record)
    engine.abort_request("base")
    engine.step()
    load_start = slow_reads[0]
    during = [b - a for a, b in zip(times, times[1:]) if b > load_start and a < load_start + DELAY_S]
    print(f"base stream: {len(during)} tokens during the {DELAY_S} s read; max gap {max(during) * 1e3:.1f} ms",
          sorted(during)[-5:])
    assert len(slow_reads) == 1
    assert len(during) >= 5 and max(during) < DELAY_S / 4, during
    assert engine.scheduler.num_steps - steps_before >= 3
    expected = _llm(tiny_llama).generate([PROMPT], _greedy(6), use_tqdm=False, lora_request=lora)
    assert finished["lora"].error is None
    assert finished["lora"].outputs[0].token_ids == expected[0].outputs[0].token_ids


def test_requests_behind_a_pending_adapter_are_not_held(tiny_llama, adapters, slow_reads) -> None:
    """FCFS otherwise: two requests for an adapter first in line, then a base request: the base request runs (and
    finishes) while the adapter is read; both of the adapter's requests wait on the one read."""
    llm = _llm(tiny_llama)
    _warm(llm, LoRARequest("p3", 4, adapters[3]), slow_reads)
    engine = llm.llm_engine
    lora = LoRARequest("p1", 2, adapters[1])
    engine.add_request("lora1", PROMPT, _greedy(4), lora_request=lora)
    engine.add_request("lora2", PROMPT[:5], _greedy(4), lora_request=lora)
    engine.add_request("base", PROMPT, _greedy(3))
    done_at = {}
    finished = _run(engine, {"lora1", "lora2", "base"}, lambda rid, t: done_at.setdefault(rid, t))
    assert len(slow_reads) == 1  # one read per adapter
    assert done_at["base"] - slow_reads[0] < DELAY_S / 2 < done_at["lora1"] - slow_reads[0]  # base did not wait
    assert all(finished[r].error is None and len(finished[r].outputs[0].token_ids) == 4 for r in ("lora1", "lora2"))


@pytest.mark.parametrize("fault", ["nan", "corrupt", "removed"])
def test_failed_read_fails_its_requests_alone(tiny_llama, adapters, tmp_path, slow_reads, fault: str) -> None:
    """NaN weights, or a file truncated or a directory removed after the request arrived (while its read sleeps):
    the read, off the loop, fails both of that adapter's requests, naming model and the file; the base model's and
    another adapter's finish with their tokens."""
    path = shutil.copytree(adapters[2], str(tmp_path / "bad"))
    bad, good = LoRARequest("bad", 3, path), LoRARequest("good", 4, adapters[3])
    llm = _llm(tiny_llama)
    expected = {r: o.outputs[0].token_ids for r, o in zip(
        ("base", "good"), llm.generate([PROMPT] * 2, _greedy(5), use_tqdm=False, lora_request=[None, good]))}
    llm = _llm(tiny_llama)  # good not yet read
    if fault == "nan":  # the arrival checks read the header only
        poison(path, float("nan"))
    engine = llm.llm_engine
    for rid, lora in (("bad1", bad), ("base", None), ("good", good), ("bad2", bad)):
        engine.add_request(rid, PROMPT, _greedy(5), lora_request=lora)
    if fault == "corrupt":
        with open(os.path.join(path, WEIGHTS_FILE), "r+b") as f:
            f.truncate(100)
    elif fault == "removed":
        shutil.rmtree(path)
    finished = _run(engine, {"bad1", "bad2", "base", "good"})
    word = {"nan": "NaN or inf", "corrupt": "corrupt", "removed": "does not exist"}[fault]
    for rid in ("bad1", "bad2"):
        error = finished[rid].error
        assert isinstance(error, RequestError) and error.param == "model", error
        assert path in str(error) and word in str(error), error
    if fault == "nan":
        assert Q_A in str(finished["bad1"].error)
    for rid in ("base", "good"):
        assert finished[rid].error is None and finished[rid].outputs[0].token_ids == expected[rid]
    # the engine goes on
    outs = llm.generate([PROMPT], _greedy(5), use_tqdm=False, lora_request=good)
    assert outs[0].outputs[0].token_ids == expected["good"]


def test_offline_many_adapters_same_tokens_as_inline_reads(tiny_llama, adapters, monkeypatch) -> None:
    """Four adapters through a host cache of two and one device slot, twice (evicted adapters are read again),
    with reads slowed and reordered: the tokens equal those with every read done inside the step."""
    from engine.lora import manager

    loras = [LoRARequest(f"p{i}", i + 1, p) for i, p in enumerate(adapters)]
    prompts = [PROMPT[: 3 + i] for i in range(8)]
    per_prompt = [loras[i % 4] if i % 3 else None for i in range(8)] * 2
    kwargs = dict(max_loras=1, max_cpu_loras=2)
    inline = _llm(tiny_llama, **kwargs)
    core = inline.llm_engine.engine_core
    core.lora_prefetcher.shutdown()
    core.lora_prefetcher = core.scheduler.lora_ready = None  # every read inside the step, as before
    expected = [o.outputs[0].token_ids for o in inline.generate(prompts * 2, _greedy(6), use_tqdm=False,
                                                                 lora_request=per_prompt)]
    real = manager.read_adapter

    def jittered(path, lora_int_id, *args, **kwargs):
        time.sleep(0.05 * (lora_int_id % 3))
        return real(path, lora_int_id, *args, **kwargs)

    monkeypatch.setattr(manager, "read_adapter", jittered)
    before = set(threading.enumerate())
    llm = _llm(tiny_llama, **kwargs)
    for _ in range(2):
        outs = llm.generate(prompts * 2, _greedy(6), use_tqdm=False, lora_request=per_prompt)
        assert [o.outputs[0].token_ids for o in outs] == expected
    readers = [t for t in threading.enumerate() if t not in before and t.name.startswith("gantry-lora-read")]
    assert readers
    llm.llm_engine.engine_core.shutdown()  # joins the read threads
    assert not any(t.is_alive() for t in readers)


def test_scheduler_passes_over_pending_adapters_in_order() -> None:
    """No model: waiting a (adapter 1 being read), base, c (adapter 1), d (adapter 2, ready). One step takes base and
    d and leaves a and c waiting in order, and does not call a that nothing can run unschedulable; once adapter 1
    is ready a and c run, a first. A running sequence whose adapter left memory waits too, keeping its pages."""
    from engine.block_manager import BlockManager
    from engine.outputs import ModelRunnerOutput, RequestMetrics
    from engine.scheduler import Scheduler
    from engine.sequence import Request, Sequence

    sched = Scheduler(BlockManager(64, 4, False), 8, 64, [2], max_model_len=512)
    sched.max_loras = 2
    pending = {1}
    sched.lora_ready = lambda lora: lora.lora_int_id not in pending
    one, two = LoRARequest("one", 1, "/x"), LoRARequest("two", 2, "/y")

    def add(rid: str, lora: LoRARequest | None) -> Sequence:
        req = Request(rid, None, [5, 6, 7], _greedy(4), RequestMetrics(0.0), 4, lora_request=lora)
        req.seqs.append(Sequence(rid, req, 0, [5, 6, 7], 3))
        sched.add(req.seqs[0])
        return req.seqs[0]

    def step() -> list[Sequence]:
        so, scheduled = sched.schedule()
        ids = [s.seq_id for s in scheduled]
        sched.update_from_output(so, scheduled, ModelRunnerOutput(ids, [9] * len(ids)))
        return scheduled

    a = add("a", one)
    assert step() == [] and list(sched.waiting) == [a] and not sched.unschedulable
    base, c, d = add("base", None), add("c", one), add("d", two)
    assert step() == [base, d] and list(sched.waiting) == [a, c]
    pending.clear()
    assert step() == [base, d, a, c] and not sched.waiting
    pending.add(2)  # d's adapter left host memory and its slot
    assert step() == [base, a, c] and d in sched.running and d.block_table
    pending.clear()
    assert step() == [base, d, a, c]
