"""/ping (GET and POST, SageMaker's health route in vLLM): /health's answer, without the API key."""
from __future__ import annotations

import httpx

from tests.server.conftest import LiveServer


def test_ping_answers_as_health(server: LiveServer) -> None:
    health = httpx.get(server.url("/health"), timeout=10)
    for method in ("GET", "POST"):
        r = httpx.request(method, server.url("/ping"), timeout=10)
        assert (r.status_code, r.json()) == (health.status_code, health.json()) == (200, {"status": "ok"}), method
    assert httpx.put(server.url("/ping"), timeout=10).status_code == 405


def test_ping_needs_no_key(keyed_server: LiveServer) -> None:
    assert httpx.post(keyed_server.url("/v1/completions"), json={"prompt": "Hi"}, timeout=10).status_code == 401
    for method in ("GET", "POST"):
        r = httpx.request(method, keyed_server.url("/ping"), timeout=10)
        assert r.status_code == 200 and r.json() == {"status": "ok"}, method
