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
