"""benchmarks/throughput.py's engine arguments: --tensor-parallel-size / --pipeline-parallel-size (and vLLM's -tp /
-pp) reach the LLM, and every argument it passes is one the engine's config takes."""
from __future__ import annotations

import dataclasses

import pytest

from benchmarks.throughput import engine_kwargs, make_workload, parse_args
from engine.config import EngineConfig


@pytest.mark.parametrize("argv, tp, pp", [([], 1, 1), (["--tensor-parallel-size", "2"], 2, 1),
                                          (["-tp", "2", "-pp", "2"], 2, 2),
                                          (["--pipeline-parallel-size", "4"], 1, 4)])
def test_parallel_sizes_reach_the_engine(argv: list[str], tp: int, pp: int) -> None:
    kwargs = engine_kwargs(make_workload("w3", 0), parse_args(["--workload", "w3", *argv]))
    assert kwargs["tensor_parallel_size"] == tp and kwargs["pipeline_parallel_size"] == pp
    assert kwargs["max_model_len"] == 2048  # W3: 1024 in + 512 out, at least 2048
    assert set(kwargs) <= {f.name for f in dataclasses.fields(EngineConfig)}
    config = EngineConfig(model="unused", **kwargs)
    assert (config.tensor_parallel_size, config.pipeline_parallel_size) == (tp, pp)
    assert config.uses_async_scheduling("cuda") == (pp == 1)  # the engine's default: pipeline lanes overlap steps


def test_no_async_scheduling_turns_it_off() -> None:
    kwargs = engine_kwargs(make_workload("w1", 0), parse_args(["--no-async-scheduling"]))
    assert EngineConfig(model="unused", **kwargs).uses_async_scheduling("cuda") is False
