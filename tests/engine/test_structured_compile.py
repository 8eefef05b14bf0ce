"""Grammars compile off the engine loop (StructuredOutputManager.start_request), as vLLM's do: while a costly
grammar compiles, running streams keep getting tokens, the constrained request then runs constrained, a compile
that fails fails its request alone, and an abort while compiling leaves nothing behind. Embedded SmolLM2, CPU."""
from __future__ import annotations

import re
import time

import pytest

from engine import LLM, SamplingParams
from engine.structured import StructuredOutputsParams
from engine.structured.manager import StructuredOutputManager
from engine.structured.params import StructuredOutputsError

COMPILE_DELAY_S = 4.0
REGEX = r"(yes|no), [0-9]{1,3}"


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(request: pytest.FixtureRequest):
    llm = LLM(dtype="float32", async_scheduling=request.param)
    llm.llm_engine.stream_outputs = True  # every step's outputs, as the server gets them
    yield llm.llm_engine
    llm.llm_engine.shutdown()


@pytest.fixture
def slow_compile(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Each compile sleeps COMPILE_DELAY_S first, as a costly grammar takes; returns [start, end] of the last."""
    compile_now = StructuredOutputManager.compile
    window: list[float] = []

    def slow(self, p, eos_token_ids):
        window[:] = [time.perf_counter()]
        time.sleep(COMPILE_DELAY_S)
        compiled = compile_now(self, p, eos_token_ids)
        window.append(time.perf_counter())
        return compiled

    monkeypatch.setattr(StructuredOutputManager, "compile", slow)
    return window


def run(engine, until: set[str]) -> dict[str, list[tuple[float, object]]]:
    """Step until the requests in `until` finish: request id -> [(when, its output)] of each step."""
    outputs: dict[str, list[tuple[float, object]]] = {}
    while until - {rid for rid, outs in outputs.items() if outs[-1][1].finished}:
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            outputs.setdefault(out.request_id, []).append((now, out))
    return outputs


def plain(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_running_stream_goes_on_while_a_grammar_compiles(engine, slow_compile: list[float]) -> None:
    engine.add_request("stream", "Tell me a long story.", plain(400))
    run_until_tokens = time.perf_counter() + 30
    while engine.engine_core.has_work() and time.perf_counter() < run_until_tokens:
        if any(o.outputs[0].token_ids for o in engine.step()):
            break  # the stream is decoding
    engine.add_request("json", "Answer yes or no.", SamplingParams(
        temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(regex=REGEX)))
    outputs = run(engine, {"json"})
    start, end = slow_compile
    # steps ran while the grammar compiled, and the stream's text grew in them (the loop compiled it before:
    # no step at all in that window)
    during = [when for when, out in outputs["stream"] if start < when < end and out.outputs[0].token_ids]
    assert len(during) >= 2, (during, start, end)
    assert re.fullmatch(REGEX, outputs["json"][-1][1].outputs[0].text), outputs["json"][-1][1].outputs[0].text
    engine.abort_request("stream")
    run(engine, {"stream"})


def test_failed_compile_fails_its_request_alone(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, p, eos_token_ids):
        time.sleep(0.2)
        raise StructuredOutputsError("structured_outputs.regex", "cannot be compiled: broken on purpose")

    monkeypatch.setattr(StructuredOutputManager, "compile", broken)
    engine.add_request("ok", "Hello", plain(8))
    engine.add_request("bad", "Hello", SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(regex=REGEX)))
    outputs = run(engine, {"ok", "bad"})
    assert len(outputs["ok"][-1][1].outputs[0].token_ids) == 8
    error = outputs["bad"][-1][1].error
    assert error is not None and "structured_outputs.regex" in str(error), error


def test_a_compile_alone_is_no_work_for_the_hang_watchdog(engine, slow_compile: list[float]) -> None:
    """The server's watchdog exits when steps stop while the core has work; a request waiting only for its grammar
    is not a step overdue (a compile longer than engine_hang_timeout_s would have killed the server)."""
    core = engine.engine_core
    while core.has_work():  # a step of an earlier test still in flight (async scheduling)
        engine.step()
    engine.add_request("slow", "Hello", SamplingParams(
        temperature=0, max_tokens=4, structured_outputs=StructuredOutputsParams(regex=REGEX)))
    for _ in range(50):  # under async scheduling a first step may carry the earlier requests' finished ids
        engine.step()
        if not core.get_stats().has_work:
            break
    assert core.structured_output_manager.compiling and not core.get_stats().has_work
    run(engine, {"slow"})
    assert not core.get_stats().has_work


def test_abort_while_compiling(engine, slow_compile: list[float]) -> None:
    engine.add_request("gone", "Hello", SamplingParams(
        temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(regex=REGEX)))
    engine.abort_request("gone")
    run(engine, {"gone"})
    som = engine.engine_core.structured_output_manager
    deadline = time.perf_counter() + 5
    while engine.engine_core.has_work() and time.perf_counter() < deadline:
        engine.step()
    assert "gone" not in som.samples and "gone" not in engine.engine_core.requests


def test_a_costly_grammar_does_not_hold_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grammars compile on at least two workers: while one compiles for long (a regex such as 'a*' * 500 takes a
    minute), a later request's grammar compiles and its request is collected."""
    import threading
    from types import SimpleNamespace

    from engine.structured import manager as manager_module

    assert manager_module.COMPILE_WORKERS >= 2
    release = threading.Event()

    def compile_(self, p, eos_token_ids):
        if p.regex == "slow":
            release.wait(60)
        return p.regex

    monkeypatch.setattr(StructuredOutputManager, "compile", compile_)
    monkeypatch.setattr(StructuredOutputManager, "_add_matchers", lambda self, request, compiled: None)
    manager = StructuredOutputManager(lambda: None, 8)

    def request(request_id: str) -> SimpleNamespace:
        return SimpleNamespace(request_id=request_id,
                               params=SimpleNamespace(structured_outputs=StructuredOutputsParams(regex=request_id)))

    try:
        manager.start_request(request("slow"), [])
        manager.start_request(request("fast"), [])
        deadline = time.perf_counter() + 20
        while not manager.ready("fast") and time.perf_counter() < deadline:
            manager.wait(0.1)
            assert manager.collect() == []
        assert manager.ready("fast") and not manager.ready("slow")
    finally:
        release.set()
        manager.shutdown()
