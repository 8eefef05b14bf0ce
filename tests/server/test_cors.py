"""CORS (vLLM's --allowed-origins/-methods/-headers, --allow-credentials): preflights answered with the
Access-Control-* headers, before the key check; responses to an allowed Origin carry
Access-Control-Allow-Origin; an origin not allowed gets none. The default policy on the shared live
servers; a restricted one on a small in-process Sanic app driven through ASGI."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from sanic import Request, Sanic
from sanic.response import HTTPResponse, json

from engine.cli_args import parse_configs
from engine.config import ConfigError, ServerConfig
from engine.server.app import OpenAIErrorHandler
from engine.server.cors import register_cors
from tests.server.conftest import LiveServer

OK = "http://ok.example"
PREFLIGHT = {"Origin": "http://any.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("access-control-")}


def test_default_preflight_allows_any_origin(server: LiveServer) -> None:
    r = httpx.options(server.url("/v1/chat/completions"), headers=PREFLIGHT, timeout=10)
    assert r.status_code == 200, r.text  # it was a 405
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"].split(", ")
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert "access-control-allow-credentials" not in r.headers


def test_default_responses_carry_allow_origin(server: LiveServer) -> None:
    r = httpx.get(server.url("/v1/models"), headers={"Origin": "http://any.example"}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    r = httpx.post(server.url("/v1/completions"), json={"prompt": "Hi", "max_tokens": 2, "stream": True},
                   headers={"Origin": "http://any.example"}, timeout=60)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"  # a stream too
    assert cors_headers(httpx.get(server.url("/v1/models"), timeout=10)) == {}  # no Origin: no CORS headers


def test_options_that_is_no_preflight_is_still_405(server: LiveServer) -> None:
    assert httpx.options(server.url("/v1/models"), timeout=10).status_code == 405


def test_preflight_needs_no_key_and_errors_carry_allow_origin(keyed_server: LiveServer) -> None:
    """The browser sends no Authorization on a preflight; a 401 must still be readable by the page."""
    r = httpx.options(keyed_server.url("/v1/completions"), headers=PREFLIGHT, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", r.text
    r = httpx.post(keyed_server.url("/v1/completions"), json={"prompt": "Hi"}, headers={"Origin": OK}, timeout=10)
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"


@pytest.fixture(scope="module")
def restricted() -> Iterator[httpx.AsyncClient]:
    """A Sanic app with the server's error handler and a restricted policy, served through ASGI."""
    config = ServerConfig(allowed_origins=[OK], allowed_methods=["GET", "POST"], allowed_headers=["Authorization"],
                          allow_credentials=True)
    app = Sanic("cors_test", error_handler=OpenAIErrorHandler(), configure_logging=False)
    register_cors(app, config)

    @app.get("/v1/models")
    async def models(request: Request) -> HTTPResponse:
        return json({"data": []}, headers={"Vary": "Accept-Encoding"})

    loop = asyncio.new_event_loop()
    received: asyncio.Queue = asyncio.Queue()
    sent: asyncio.Queue = asyncio.Queue()

    async def start() -> None:
        await received.put({"type": "lifespan.startup"})
        loop.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, received.get, sent.put))
        assert (await sent.get())["type"] == "lifespan.startup.complete"

    loop.run_until_complete(start())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    client.run = loop.run_until_complete  # type: ignore[attr-defined]
    yield client
    loop.run_until_complete(client.aclose())
    loop.close()


def call(client: httpx.AsyncClient, method: str, headers: dict[str, str]) -> httpx.Response:
    return client.run(client.request(method, "/v1/models", headers=headers))  # type: ignore[attr-defined]


def test_restricted_preflight(restricted: httpx.AsyncClient) -> None:
    r = call(restricted, "OPTIONS", {"Origin": OK, "Access-Control-Request-Method": "POST",
                                     "Access-Control-Request-Headers": "Authorization, Content-Type"})
    assert r.status_code == 200, r.text
    assert cors_headers(r) == {
        "access-control-allow-origin": OK,  # echoed: credentials rule out *
        "access-control-allow-credentials": "true",
        "access-control-allow-methods": "GET, POST",
        "access-control-allow-headers": "accept, accept-language, authorization, content-language, content-type",
        "access-control-max-age": "600",
    }
    assert r.headers["vary"] == "Origin"


@pytest.mark.parametrize("headers, failure", [
    ({"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"}, "origin"),
    ({"Origin": OK, "Access-Control-Request-Method": "DELETE"}, "method"),
    ({"Origin": OK, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "X-Other"}, "headers"),
])
def test_restricted_preflight_refused(restricted: httpx.AsyncClient, headers: dict[str, str], failure: str) -> None:
    r = call(restricted, "OPTIONS", headers)
    assert r.status_code == 400 and r.text == f"Disallowed CORS {failure}"  # not 2xx: the browser blocks the request
    assert "access-control-allow-methods" not in r.headers
    if failure == "origin":
        assert cors_headers(r) == {}


def test_restricted_responses(restricted: httpx.AsyncClient) -> None:
    r = call(restricted, "GET", {"Origin": OK})
    assert r.status_code == 200
    assert cors_headers(r) == {"access-control-allow-origin": OK, "access-control-allow-credentials": "true"}
    assert r.headers["vary"] == "Accept-Encoding, Origin"  # the route's own Vary is kept
    r = call(restricted, "GET", {"Origin": "http://evil.example"})
    assert r.status_code == 200 and cors_headers(r) == {}


def test_cors_flags() -> None:
    _, server, _ = parse_configs(["--allowed-origins", OK, "http://two.example", "--allowed-methods", '["GET"]',
                                  "--allow-credentials"])
    assert server.allowed_origins == [OK, "http://two.example"] and server.allowed_methods == ["GET"]
    assert server.allowed_headers == ["*"] and server.allow_credentials is True
    assert ServerConfig().allowed_origins == ["*"] and ServerConfig().allow_credentials is False


@pytest.mark.parametrize("field, value", [("allowed_origins", "*"), ("allowed_methods", [""]),
                                          ("allowed_headers", [1])])
def test_bad_cors_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as e:
        ServerConfig(**{field: value})
    assert e.value.param == field
