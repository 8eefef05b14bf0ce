"""No LoRA adapter may take the served model's name (a request's `model` would name both): lora_modules
at start-up, offline and through engine.serve, is a ConfigError naming lora_modules.<name>; the runtime
path is tests/server/test_lora_api.py's test_runtime_adapter_named_like_the_model_refused."""
from __future__ import annotations

import os

import pytest

from engine import LLM
from engine.config import ConfigError


@pytest.fixture(scope="module")
def adapter(tiny_llama: str, tmp_path_factory) -> str:
    from tests.engine.test_lora import write_adapter

    return write_adapter(tiny_llama, str(tmp_path_factory.mktemp("adapter")), 4, 8, ["q_proj"], False, 0)


@pytest.mark.parametrize("served", [None, "my-model"])
def test_lora_module_named_like_the_model_refused(tiny_llama: str, adapter: str, served: str | None) -> None:
    name = served or os.path.basename(tiny_llama)
    with pytest.raises(ConfigError, match="already taken") as e:
        LLM(tiny_llama, served_model_name=served, enable_lora=True, lora_modules={name: adapter}, num_kv_blocks=64)
    assert e.value.param == f"lora_modules.{name}"


def test_serve_lora_module_named_like_the_model_exits_2(tiny_llama: str, adapter: str) -> None:
    from tests.server.conftest import free_port
    from tests.server.test_serve_cli import run_serve

    r = run_serve("--host", "127.0.0.1", "--port", str(free_port()), "--device", "cpu", "--model", tiny_llama,
                  "--served-model-name", "m", "--enable-lora", "--lora-modules", f"m={adapter}")
    assert r.returncode == 2, r.stderr
    assert "lora_modules.m: the name 'm' is already taken" in r.stderr, r.stderr  # the core's start-up error
