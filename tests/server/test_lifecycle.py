"""A keyed server's life: /ready is 503 while the model loads and 200 after; the API key guards
every /v1 route, tokenize/detokenize and (when asked) /metrics; a full waiting queue gives 503
with Retry-After; SIGTERM drains in-flight requests, aborts what outlives the grace period, exits 0."""
from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, launch, wait_ready

KEY = "test-key-7f3a9c"  # given through an environment variable, never on the command line
GRACE_S = 5.0


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory):
    s = launch(tmp_path_factory.mktemp("keyed"), "--api-key-env", "GANTRY_TEST_API_KEY", "--metrics-require-key",
               "--max-num-seqs", "2", "--max-waiting-requests", "1", "--max-model-len", "2048",
               "--shutdown-grace-s", str(GRACE_S), env={"GANTRY_TEST_API_KEY": KEY}, api_key=KEY)
    # While the model loads: alive, not ready, and the API says so with 503 + Retry-After.
    loading: dict = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not loading:
        try:
            health = httpx.get(s.url("/health"), timeout=5)
            ready = httpx.get(s.url("/ready"), timeout=5)
            models = httpx.get(s.url("/v1/models"), headers=s.headers, timeout=5)
            loading = {"health": health.status_code, "ready": ready.status_code, "models": models.status_code,
                       "retry_after": models.headers.get("Retry-After"), "models_body": models.json()}
        except httpx.TransportError:
            time.sleep(0.05)
    s.loading = loading
    wait_ready(s)
    yield s
    s.stop()


def test_ready_503_while_loading_then_200(keyed: LiveServer):
    assert keyed.loading["health"] == 200
    assert keyed.loading["ready"] == 503
    assert keyed.loading["models"] == 503 and keyed.loading["retry_after"]
    assert keyed.loading["models_body"]["error"]["code"] == "not_ready"
    assert keyed.ready_statuses[-1] == 200
    assert httpx.get(keyed.url("/ready")).status_code == 200


GUARDED = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                      "max_tokens": 2}),
    ("POST", "/tokenize", {"model": MODEL, "prompt": "Hi"}),
    ("POST", "/detokenize", {"model": MODEL, "tokens": [1, 2]}),
    ("GET", "/metrics", None),  # guarded because of --metrics-require-key
]


@pytest.mark.parametrize("method,path,body", GUARDED, ids=[p for _, p, _ in GUARDED])
def test_auth_guards_route(keyed: LiveServer, method: str, path: str, body: dict | None):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        r = httpx.request(method, keyed.url(path), json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in r.text
    r = httpx.request(method, keyed.url(path), json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("path", ["/health", "/ready", "/version"])
def test_open_routes_need_no_key(keyed: LiveServer, path: str):
    assert httpx.get(keyed.url(path)).status_code == 200


def test_queue_full_gives_503_with_retry_after(keyed: LiveServer):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True}

    def post(_: int) -> httpx.Response:
        return httpx.post(keyed.url("/v1/completions"), json=body, headers=keyed.headers, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    # A burst arrives before the engine schedules any of it: all of it counts as waiting.
    assert statuses.count(200) >= 1 and statuses.count(503) >= 1, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] and r.json()["error"]["code"] == "overloaded"
        else:
            assert r.json()["usage"]["completion_tokens"] == 8
    assert post(0).status_code == 200  # and once the queue has drained, requests are taken again
    # more sequences in one request than the queue takes (prompts x n) never fit: a 400 naming n, not a 503
    r = httpx.post(keyed.url("/v1/completions"), json={**body, "n": 2}, headers=keyed.headers, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text


def test_key_never_logged_or_exported(keyed: LiveServer):
    assert KEY not in keyed.log()
    assert KEY not in httpx.get(keyed.url("/metrics"), headers=keyed.headers).text


def test_sigterm_drains_then_exits_0(keyed: LiveServer):
    """Run last in this module: the short request finishes, the endless one is aborted after the grace period."""
    results: dict[str, list[dict]] = {}
    first_token = {"short": threading.Event(), "long": threading.Event()}

    def stream(name: str, max_tokens: int) -> None:
        body = {"model": MODEL, "prompt": "Write a very long story:", "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream("POST", keyed.url("/v1/completions"), json=body, headers=keyed.headers,
                          timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first_token[name].set()
        results[name] = events

    # One after the other: with --max-waiting-requests 1, two at once could be refused as overload.
    threads = [threading.Thread(target=stream, args=("long", 1900)), threading.Thread(target=stream, args=("short", 6))]
    threads[0].start()
    assert first_token["long"].wait(60)
    threads[1].start()
    assert first_token["short"].wait(60)
    t_term = time.monotonic()
    keyed.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(keyed.url("/ready")).status_code == 503
    refused = httpx.post(keyed.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 2},
                         headers=keyed.headers)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    for t in threads:
        t.join(60)
    assert keyed.proc.wait(30) == 0
    elapsed = time.monotonic() - t_term
    assert GRACE_S <= elapsed < GRACE_S + 15, elapsed

    def finish(events: list[str]) -> str:
        assert events[-1] == "[DONE]"
        return [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]][-1]

    assert finish(results["short"]) == "length"
    assert finish(results["long"]) == "abort"
    log = keyed.log()
    assert "SIGTERM: draining 2 in-flight requests" in log and "aborting 1 requests" in log


def test_sigterm_while_loading_exits_0_without_traceback(tmp_path):
    """SIGTERM (docker stop) while the model still loads: exit 0 at once, no traceback. Before the
    fix Sanic was still awaiting a start-up listener (the ready-line logger), stopping the loop
    under it logged 'Event loop stopped before Future completed' and the process never exited."""
    s = launch(tmp_path, "--max-model-len", "2048")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # listening, model not loaded yet
            try:
                if httpx.get(s.url("/ready"), timeout=5).status_code == 503:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0, s.log()[-3000:]
        assert "Traceback" not in s.log(), s.log()[-3000:]
    finally:
        s.stop()


def test_sigint_aborts_streams_cleanly_and_exits_0(tmp_path):
    """Ctrl-C (SIGINT) with a stream open: no grace period, but the stream still gets its final chunk (abort)
    and [DONE], the process exits 0 within seconds, and nothing is logged as an error. Before, Sanic stopped at
    once: the client saw an incomplete chunked read and the log 'cannot send to the engine core' (fuzzing)."""
    s = wait_ready(launch(tmp_path, "--max-model-len", "2048"))
    try:
        events: list[str] = []
        started = threading.Event()

        def stream() -> None:
            body = {"model": MODEL, "prompt": "Write a very long story:", "max_tokens": 1900, "ignore_eos": True,
                    "stream": True}
            with httpx.stream("POST", s.url("/v1/completions"), json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()

        t = threading.Thread(target=stream)
        t.start()
        assert started.wait(60)
        t_int = time.monotonic()
        s.proc.send_signal(signal.SIGINT)
        t.join(30)
        assert s.proc.wait(30) == 0, s.log()[-3000:]
        assert time.monotonic() - t_int < 15
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
        log = s.log()
        assert "SIGINT: draining 1 in-flight requests" in log and " ERROR " not in log and "Traceback" not in log, log
    finally:
        s.stop()
