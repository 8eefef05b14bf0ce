"""The generation config's sampling defaults through the API (vLLM's --generation-config): a completion or
chat request without temperature takes the model's generation_config.json (here greedy: temperature 0), one
that sets it keeps its own; --generation-config vllm ignores the file. Two servers on a tiny random model."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import LiveServer, launch, wait_ready

SEEDS = range(4)


@pytest.fixture(scope="module")
def model(tiny_llama: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("gen_api") / "model"
    shutil.copytree(tiny_llama, path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "eos_token_id": 2}))
    return str(path)


def _server(model: str, tmp_path_factory: pytest.TempPathFactory, *args: str) -> Iterator[LiveServer]:
    s = wait_ready(launch(tmp_path_factory.mktemp("gen_api_server"), "--model", model, *args))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def server_auto(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from _server(model, tmp_path_factory)


@pytest.fixture(scope="module")
def server_vllm(model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from _server(model, tmp_path_factory, "--generation-config", "vllm")


def completion(server: LiveServer, **fields) -> str:
    r = httpx.post(server.url("/v1/completions"), json={"prompt": "The quick brown fox", "max_tokens": 8,
                                                        "ignore_eos": True, **fields}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def chat(server: LiveServer, **fields) -> str:
    r = httpx.post(server.url("/v1/chat/completions"), json={
        "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, "ignore_eos": True, **fields},
        timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("call", [completion, chat])
def test_unset_temperature_takes_the_files(server_auto: LiveServer, call) -> None:
    greedy = call(server_auto, temperature=0)
    assert {call(server_auto, seed=seed) for seed in SEEDS} == {greedy}
    # a request's own temperature wins: sampling at 1.0 with different seeds
    assert {call(server_auto, temperature=1.0, seed=seed) for seed in SEEDS} != {greedy}


def test_startup_log_names_the_defaults(server_auto: LiveServer) -> None:
    assert server_auto.log().count("default sampling params from the model's generation_config.json: "
                                   "temperature=0.0") == 1


def test_generation_config_vllm_ignores_the_file(server_vllm: LiveServer) -> None:
    greedy = completion(server_vllm, temperature=0)
    assert {completion(server_vllm, seed=seed) for seed in SEEDS} != {greedy}  # temperature 1.0, vLLM's own
    assert "default sampling params" not in server_vllm.log()
