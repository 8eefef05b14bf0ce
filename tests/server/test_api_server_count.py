"""`--api-server-count 2` (issue 11): two API processes share the port and the one engine core.
Every openai-client test passes against them, and /metrics, whichever process answers, counts
every request once; SIGTERM drains both and exits 0."""
from __future__ import annotations

import time

import pytest

from tests.server.conftest import LiveServer, launch, wait_ready
from tests.server.test_openai_api import *  # noqa: F403 - every openai client test, against two API processes

# Collected here again with this module's `server` (two API processes) instead of the session's.


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = wait_ready(launch(tmp_path_factory.mktemp("two-api"), "--api-server-count", "2"))
    yield s
    assert s.stop() == 0, s.log()[-3000:]
    assert "Traceback" not in s.log(), s.log()[-3000:]


def test_two_api_processes_answer(server: LiveServer) -> None:
    assert "2 API processes share the port" in server.log()


def test_metrics_count_every_request_once(server: LiveServer) -> None:
    import httpx

    from tests.server.conftest import MODEL

    def totals() -> tuple[float, float]:
        m = server.metrics()
        success = sum(v for (name, _), v in m.items() if name == "gantry:request_success_total")
        http = sum(v for (name, labels), v in m.items()
                   if name == "gantry:http_requests_total" and ("route", "/v1/completions") in labels)
        return success, http

    server.wait_idle()
    before = totals()
    for i in range(12):  # new connections: the kernel spreads them over both processes
        with httpx.Client() as client:
            r = client.post(server.url("/v1/completions"), json={"model": MODEL, "prompt": f"{i} plus", "max_tokens": 2})
            assert r.status_code == 200, r.text
    server.wait_idle()
    scrapes = {totals() for _ in range(6)}  # each scrape may be answered by either process
    assert scrapes == {(before[0] + 12, before[1] + 12)}, (before, scrapes)


def test_engine_counters_never_go_back(server: LiveServer) -> None:
    """Each API process has its own copy of the core's stats (an idle one refreshes it with the heartbeat,
    every 0.5 s): scrapes answered by both processes in turn saw generation_tokens_total go back, which
    Prometheus reads as a counter reset (rate() spikes). Streams run on one connection meanwhile."""
    import threading

    import httpx

    from tests.server.conftest import MODEL

    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 100, "ignore_eos": True}
    done, statuses = threading.Event(), []

    def generate() -> None:
        with httpx.Client() as client:  # one connection: one process
            while not done.is_set():
                statuses.append(client.post(server.url("/v1/completions"), json=body, timeout=120).status_code)

    streaming = threading.Thread(target=generate)
    streaming.start()
    seen = []
    try:
        while len(seen) < 40:
            with httpx.Client() as client:  # a new connection: either process answers
                r = client.get(server.url("/metrics"), timeout=10)
            seen.append(next(float(line.rsplit(" ", 1)[1]) for line in r.text.splitlines()
                             if line.startswith("gantry:generation_tokens_total")))
            time.sleep(0.05)
    finally:
        done.set()
        streaming.join()
    assert set(statuses) == {200}, statuses
    assert seen == sorted(seen) and seen[-1] > seen[0], seen
