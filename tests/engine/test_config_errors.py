"""EngineConfig and ServerConfig refuse a value with a ConfigError naming the field (found by fuzzing the
offline API): every field's type from the dataclass (a bool is not an int), sizes and timeouts."""
from __future__ import annotations

import dataclasses

import pytest

from engine import LLM
from engine.config import ConfigError, EngineConfig, ServerConfig, load_config_file


@pytest.mark.parametrize("cls", [EngineConfig, ServerConfig])
def test_every_field_refuses_a_value_of_another_type(cls: type) -> None:
    """One generic check: an object of no config type is refused by every field, naming it."""
    for f in dataclasses.fields(cls):
        with pytest.raises(ConfigError) as e:
            cls(**{f.name: object()})
        assert e.value.param == f.name, (f.name, str(e.value))


@pytest.mark.parametrize("cls,kwargs,param", [
    (EngineConfig, dict(tensor_parallel_size="2"), "tensor_parallel_size"),  # was TypeError: '<' not supported
    (EngineConfig, dict(max_num_seqs="8"), "max_num_seqs"),
    (EngineConfig, dict(enforce_eager="yes"), "enforce_eager"),  # was taken as true
    (EngineConfig, dict(enable_prefix_caching=0), "enable_prefix_caching"),
    (EngineConfig, dict(max_num_seqs=True), "max_num_seqs"),  # a bool is not an int here
    (EngineConfig, dict(max_model_len=512.0), "max_model_len"),
    (EngineConfig, dict(gpu_memory_utilization=float("nan")), "gpu_memory_utilization"),
    (EngineConfig, dict(kv_cache_memory_gib=float("inf")), "kv_cache_memory_gib"),
    (EngineConfig, dict(hf_overrides=None), "hf_overrides"),
    (EngineConfig, dict(model=3), "model"),
    (ServerConfig, dict(port="8000"), "port"),
    (ServerConfig, dict(ui="no"), "ui"),
])
def test_wrong_type_names_the_field(cls: type, kwargs: dict, param: str) -> None:
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert e.value.param == param and repr(kwargs[param]) in str(e.value)


def test_right_types_still_accepted() -> None:
    """An int where a float is declared (YAML's `1`), None where a field is optional."""
    cfg = EngineConfig(gpu_memory_utilization=1, kv_cache_memory_gib=2, distributed_timeout_s=30,
                       async_scheduling=None, max_model_len=None, enforce_eager=True)
    assert cfg.gpu_memory_utilization == 1 and cfg.kv_cache_memory_gib == 2
    assert ServerConfig(shutdown_grace_s=0, engine_hang_timeout_s=5).shutdown_grace_s == 0


def test_llm_refuses_a_string_size(tiny_llama: str) -> None:
    for kwargs in (dict(tensor_parallel_size="2"), dict(max_num_seqs="8"), dict(enforce_eager="yes")):
        with pytest.raises(ConfigError) as e:
            LLM(tiny_llama, **kwargs)
        assert e.value.param == next(iter(kwargs))


def test_engine_yaml_types_name_the_field(tmp_path) -> None:
    path = tmp_path / "engine.yaml"
    path.write_text('engine:\n  enforce_eager: "yes"\n')
    with pytest.raises(ConfigError) as e:
        load_config_file(str(path))
    assert e.value.param == "enforce_eager"


@pytest.mark.parametrize("cls,kwargs", [
    (EngineConfig, dict(kv_cache_memory_gib=0)),  # was reported as a max_model_len error at start-up
    (EngineConfig, dict(kv_cache_memory_gib=-1.5)),
    (EngineConfig, dict(distributed_timeout_s=-1)),
    (EngineConfig, dict(distributed_timeout_s=0)),
    (ServerConfig, dict(max_request_body_bytes=0)),
    (ServerConfig, dict(max_request_body_bytes=-5)),
    (ServerConfig, dict(shutdown_grace_s=-1)),  # the launcher renders docker --stop-timeout from it
])
def test_out_of_range_names_the_field(cls: type, kwargs: dict) -> None:
    param = next(iter(kwargs))
    with pytest.raises(ConfigError) as e:
        cls(**kwargs)
    assert e.value.param == param and str(kwargs[param]) in str(e.value)
