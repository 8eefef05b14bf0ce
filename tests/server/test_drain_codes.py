"""SIGTERM while a beam search runs: its next step finds the engine stopping, and the client gets the
503 that a request refused during the drain gets, code "shutting_down" (it had no code; found hunting
lifecycle defects in the live server)."""
from __future__ import annotations

import concurrent.futures
import signal
import time

import httpx
import pytest

from tests.server.conftest import MODEL, launch, wait_ready


@pytest.fixture(scope="module")
def draining(tmp_path_factory: pytest.TempPathFactory):
    s = wait_ready(launch(tmp_path_factory.mktemp("drain_codes"), "--shutdown-grace-s", "0.5"))
    yield s
    s.stop()


def test_beam_search_cut_by_the_drain_says_shutting_down(draining) -> None:
    body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 100, "use_beam_search": True, "best_of": 3,
            "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        beam = pool.submit(httpx.post, draining.url("/v1/completions"), json=body, timeout=120)
        time.sleep(1.0)  # a few steps in
        assert not beam.done()
        draining.proc.send_signal(signal.SIGTERM)
        r = beam.result()
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "shutting_down" and r.headers["Retry-After"]
    assert draining.proc.wait(60) == 0
