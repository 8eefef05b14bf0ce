"""benchmarks/step_trace.py on a tiny CPU engine: host ms per phase of each step, and the engine's own
methods back after close() (no instance attribute left behind)."""
from __future__ import annotations

from benchmarks.step_trace import StepTrace
from engine import LLM, SamplingParams
from tests.conftest import TINY_ARCHS, write_tiny_checkpoint


def test_phases_per_step_and_close(tmp_path) -> None:
    spec = dict(TINY_ARCHS["qwen2"])
    llm = LLM(write_tiny_checkpoint(str(tmp_path), spec.pop("arch"), **spec), dtype="float32")
    engine = llm.llm_engine
    runner = engine.executor.runner
    trace = StepTrace(engine)
    engine.add_request("a", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    seen = set()
    while engine.has_unfinished_requests():
        engine.step()
        phases = trace.take_phases()
        assert all(ms >= 0 for ms in phases.values())
        seen |= set(phases)
    assert {"schedule", "prepare_forward", "launch_forward", "collect", "update_from_output"} <= seen
    assert trace.take_phases() == {}
    trace.close()
    assert not {"schedule", "collect", "prepare_forward", "submit_model"} & (
        set(vars(engine.scheduler)) | set(vars(engine.executor)) | set(vars(runner)))
    assert trace.device_steps() == []  # CPU: no device events
    engine.shutdown()


class _Event:
    """A CUDA event stand-in on CPU: record() takes the next tick; elapsed_time counts ticks."""

    ticks = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        _Event.ticks += 1
        self.t = _Event.ticks

    def elapsed_time(self, other: "_Event") -> float:
        return float(other.t - self.t)


def test_device_steps_cover_every_path(tmp_path, monkeypatch) -> None:
    """Every step gets a start (its prepare_forward) and an end (after its launch, then its sampler), in the
    runner's own submit and in the engine core's collect-then-launch order for deep chunks (async scheduling)."""
    import torch

    import engine.scheduler as scheduler_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(scheduler_module, "DEEP_CHUNK_TOKENS", 4)
    monkeypatch.setattr(scheduler_module, "DEEP_CHUNK_START", 8)
    spec = dict(TINY_ARCHS["qwen2"])
    llm = LLM(write_tiny_checkpoint(str(tmp_path), spec.pop("arch"), **spec), dtype="float32", device="cpu",
              async_scheduling=True, max_num_batched_tokens=16, enable_prefix_caching=False)
    engine = llm.llm_engine
    trace = StepTrace(engine, label=lambda so: sum(so.num_scheduled_tokens.values()))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("short", [5, 6], params)
    engine.add_request("long", list(range(5, 45)), params)  # 40 tokens in chunks: the later ones 8+ deep
    core, deep_steps = engine.engine_core, []
    original = core._collect_then_launch
    monkeypatch.setattr(core, "_collect_then_launch", lambda *a: deep_steps.append(1) or original(*a))
    while engine.has_unfinished_requests():
        engine.step()
    trace.close()
    assert deep_steps  # the engine core's split order ran
    device = trace.device_steps()
    assert device and all(busy > 0 for _, busy, _ in device) and all(idle >= 0 for *_, idle in device)
    assert sum(tokens for tokens, _, _ in device) == 2 + 40 + 2 * 3  # every step's tokens, each step once
    engine.shutdown()
