"""`python -m engine.serve` as a newcomer starts it (issue 22): $GANTRY_API_KEY protects the API,
start-up names the device, whether a key is needed and what each phase took; no progress bar in
the log; the CPU KV pool is sized for the model; a request without max_tokens gets the model's
generation default (here set by --override-generation-config)."""
from __future__ import annotations

import re

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, launch, wait_ready

KEY = "sk-startup-test"
DEFAULT_MAX_TOKENS = 7


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory):
    """The user's defaults (no test flags) but the device, a key only in the environment."""
    s = launch(tmp_path_factory.mktemp("startup"), "--device", "cpu", "--override-generation-config",
               f'{{"max_new_tokens": {DEFAULT_MAX_TOKENS}}}', env={"GANTRY_API_KEY": KEY}, api_key=KEY, base_args=())
    yield wait_ready(s)
    s.stop()


def test_gantry_api_key_in_the_environment_is_required(keyed_server: LiveServer) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert httpx.get(keyed_server.url("/v1/models"), timeout=30).status_code == 401
    assert httpx.post(keyed_server.url("/v1/chat/completions"), json=body, timeout=30).status_code == 401
    assert httpx.get(keyed_server.url("/v1/models"), headers=keyed_server.headers, timeout=30).status_code == 200


def test_start_up_log(keyed_server: LiveServer) -> None:
    log = keyed_server.log()
    lines = log.splitlines()

    def one(pattern: str) -> str:
        found = [x for x in lines if re.search(pattern, x)]
        assert len(found) == 1, (pattern, log[-3000:])
        return found[0]

    one(r"INFO gantry\.serve: device: cpu \(\d+ threads, \d+ cores\)$")
    one(r"INFO gantry\.serve: API key: required \(from GANTRY_API_KEY\)$")
    one(rf"requests without max_tokens: at most {DEFAULT_MAX_TOKENS} tokens \(generation config: the embedded "
        r"model's defaults \+ --override-generation-config\)$")
    assert KEY not in log
    startup = one(r"gantry\.serve: start-up [\d.]+ s to ready \(CPU time [\d.]+ s\): ")
    api, _, core = startup.partition("; engine core, in parallel: ")
    for phase in ("imports", "model config", "tokenizer"):
        assert re.search(rf"{phase} [\d.]+ s", api), startup
    for phase in ("start", "imports", "model config", "weights", "model build and KV pool", "warm-up"):
        assert re.search(rf"{phase} [\d.]+ s", core), startup
    print(startup)  # the figure, for the record (-s)
    # the CPU pool holds max(max_model_len, 8192) tokens (the seed's 2 GiB default was 46,592)
    one(r"KV cache: 512 blocks x 16 tokens = 8192 tokens")
    one(r"maximum concurrency for \d+ tokens per request: [\d.]+x")  # as vLLM logs it (issue 12)
    assert "Loading weights" not in log and "\r" not in log  # no tqdm bar in a file


def test_default_max_tokens_from_generation_config(keyed_server: LiveServer) -> None:
    body = {"model": MODEL, "prompt": "Once upon a time", "ignore_eos": True, "temperature": 0}
    r = httpx.post(keyed_server.url("/v1/completions"), json=body, headers=keyed_server.headers, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    assert r.json()["choices"][0]["finish_reason"] == "length"
