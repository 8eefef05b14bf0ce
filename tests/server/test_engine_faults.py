"""Through a live server (issue 21): no valid request kills the engine (int64 seeds, a huge top_k
batched with a small one), a KV pool smaller than max_model_len is refused at start-up, a request
that fails inside the engine fails alone, and an engine core that dies exits the server non-zero.
After each, the server is ready, nothing runs and every KV block is free."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, launch, wait_ready
from tests.server.faulty_core import KILL_SEED

FAIL_SEED = 4243  # the API's output processor raises while folding in such a request's tokens
# engine.serve's app with a core that dies on KILL_SEED and an output processor that fails on FAIL_SEED
FAULTY_SERVE = f"""
import sys
from engine.output_processor import OutputProcessor
from engine.serve import parse_configs
from engine.server.app import create_app
from tests.server.faulty_core import faulty_core

apply = OutputProcessor._apply

def faulty_apply(self, state, sample, out):  # the output processor's per-sample step
    if state.params.seed == {FAIL_SEED}:
        raise TypeError("injected fault in one request")
    return apply(self, state, sample, out)

OutputProcessor._apply = faulty_apply
engine_config, server_config, _ = parse_configs(sys.argv[1:])
app = create_app(engine_config, server_config, None, core_factory=faulty_core)
app.run(host=server_config.host, port=server_config.port, single_process=True, access_log=False, motd=False)
sys.exit(app.ctx.state.exit_code)
"""


def complete(server: LiveServer, timeout: float = 120, **fields) -> httpx.Response:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, **fields}
    return httpx.post(server.url("/v1/completions"), json=body, headers=server.headers, timeout=timeout)


def assert_ready_and_idle(server: LiveServer) -> None:
    assert httpx.get(server.url("/ready"), timeout=10).status_code == 200
    m = server.wait_idle()
    assert m[("gantry:num_requests_running", ())] == 0
    assert m[("gantry:num_requests_waiting", ())] == 0
    assert m[("gantry:kv_cache_usage_perc", ())] == 0


def test_any_int64_seed_is_served(server: LiveServer) -> None:
    texts = {}
    for seed in (2**62, -(2**63), 2**63 - 1, 1_732_968_000_123_456_789):  # the last: a nanosecond clock
        r = complete(server, seed=seed, temperature=1.0, max_tokens=4)
        assert r.status_code == 200, r.text
        texts[seed] = r.json()["choices"][0]["text"]
    again = complete(server, seed=2**62, temperature=1.0, max_tokens=4)
    assert again.json()["choices"][0]["text"] == texts[2**62]
    assert_ready_and_idle(server)


def test_seed_outside_int64_is_a_400_naming_it(server: LiveServer) -> None:
    for seed in (2**64 + 1, 2**63, -(2**63) - 1):
        r = complete(server, seed=seed)
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    assert_ready_and_idle(server)


def test_huge_top_k_batched_with_a_small_one(server: LiveServer) -> None:
    """The API may refuse a top_k beyond int64 (400 naming it) or serve it as "off"; either way
    the small top_k sharing its batch is served and the engine lives on."""
    sampled = dict(temperature=1.0, max_tokens=24, ignore_eos=True)
    params = [dict(top_k=2**70, **sampled), dict(top_k=5, **sampled), dict(top_k=2**62, **sampled),
              dict(top_k=5, **sampled)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # sent together, so they share batches
        responses = [f.result() for f in [pool.submit(complete, server, **p) for p in params]]
    beyond_int64, *served = responses
    assert beyond_int64.status_code == 200 or (
        beyond_int64.status_code == 400 and beyond_int64.json()["error"]["param"] == "top_k"), beyond_int64.text
    assert [r.status_code for r in served] == [200] * 3, [r.text for r in served]
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in served)
    assert_ready_and_idle(server)


def test_pool_smaller_than_max_model_len_is_refused_at_start_up(tmp_path) -> None:
    s = launch(tmp_path, "--num-kv-blocks", "96", "--max-model-len", "8192")
    try:
        code = s.proc.wait(timeout=240)
    finally:
        s.stop()
    log = s.log()
    assert code == 2, log[-3000:]
    assert "max_model_len" in log and "1536" in log  # the field, and the largest length that fits
    assert "Traceback" not in log


FAIL_AT_ONCE_SERVE = """
import sys
from engine.serve import parse_configs
from engine.server.app import create_app
from tests.server.faulty_core import fail_at_once

engine_config, server_config, _ = parse_configs(sys.argv[1:])
app = create_app(engine_config, server_config, None, core_factory=fail_at_once)
app.run(host=server_config.host, port=server_config.port, single_process=True, access_log=False, motd=False)
sys.exit(app.ctx.state.exit_code)
"""


def test_an_engine_that_fails_during_sanic_start_up_still_exits(tmp_path) -> None:
    """The fatal callback can arrive while Sanic still runs its start-up listeners; stopping the
    loop there used to leave the process hanging instead of exiting 2."""
    s = launch(tmp_path, entry=("-c", FAIL_AT_ONCE_SERVE))
    try:
        code = s.proc.wait(timeout=60)
    finally:
        s.stop()
    assert code == 2, s.log()[-3000:]
    assert "injected: refused" in s.log()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory):
    s = wait_ready(launch(tmp_path_factory.mktemp("faulty"), entry=("-c", FAULTY_SERVE)))
    yield s
    s.stop()


def test_a_request_that_fails_inside_the_engine_fails_alone(faulty: LiveServer) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good = pool.submit(complete, faulty, temperature=0.0, max_tokens=32, ignore_eos=True)
        time.sleep(0.3)  # the good request is running when the bad one joins the batch
        bad = complete(faulty, seed=FAIL_SEED, temperature=1.0)
        good = good.result()
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "internal_error", bad.text
    assert "Traceback" not in bad.text
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 32, good.text
    assert httpx.get(faulty.url("/health"), timeout=10).status_code == 200
    assert_ready_and_idle(faulty)
    assert complete(faulty, temperature=0.0).status_code == 200  # and it keeps serving
    assert faulty.proc.poll() is None


def test_engine_core_death_exits_non_zero(faulty: LiveServer) -> None:
    r = complete(faulty, seed=KILL_SEED)
    assert r.status_code == 500, r.text
    health = httpx.get(faulty.url("/health"), timeout=10)  # 503 for a moment, so probes see why
    assert health.status_code == 503 and health.json()["engine_state"] == "dead"
    try:
        code = faulty.proc.wait(timeout=60)
    except Exception:
        pytest.fail("the server stayed up with a dead engine")
    assert code not in (0, None), faulty.log()[-3000:]
    assert "engine core died" in faulty.log()
