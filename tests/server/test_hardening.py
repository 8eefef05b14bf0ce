"""Issue #21 on the HTTP side: the key guards every spelling of every route (default deny), hostile
JSON, Unicode, integers and headers are 400s naming the field, malformed HTTP framing is 400/431/414
over raw sockets, and clients hanging up are INFO lines and an aborted count, never ERROR or 5xx.
After each test the server is ready, nothing runs and every KV page is free."""
from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest
from sanic import Sanic

from engine.config import EngineConfig, ServerConfig
from engine.server.app import create_app
from tests.server.conftest import API_KEY, MODEL, LiveServer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
KEY_HEADER = f"Authorization: Bearer {API_KEY}\r\n".encode()


def raw_request(server: LiveServer, head: bytes, body: bytes = b"", timeout: float = 30.0,
                half_close: bool = True) -> tuple[int, bytes]:
    """Send bytes as they are; the status code and body of the answer (0 if none came).
    half_close=False keeps our side open (the server may otherwise take the EOF for a client that
    left before its answer); the request must then carry `Connection: close`."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(head + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    m = re.match(rb"HTTP/1\.1 (\d{3})", data)
    return (int(m[1]) if m else 0), data.partition(b"\r\n\r\n")[2]


def assert_idle(server: LiveServer) -> None:
    assert httpx.get(server.url("/ready"), timeout=10).status_code == 200
    m = server.wait_idle()
    assert m[("gantry:num_requests_running", ())] == 0
    assert m[("gantry:num_requests_waiting", ())] == 0
    assert m[("gantry:kv_cache_usage_perc", ())] == 0


@pytest.fixture(autouse=True)
def _idle_after(keyed_server: LiveServer):
    yield
    assert_idle(keyed_server)


# ---- auth: decided on the route that will run ----

TOKENIZE = {"model": MODEL, "prompt": "Hi"}
DETOKENIZE = {"model": MODEL, "tokens": [1, 2]}
CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION_BODY = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}

# Every spelling the router serves: each needs the key.
GUARDED_FORMS = [
    ("POST", "/tokenize", TOKENIZE), ("POST", "/tokenize/", TOKENIZE),
    ("POST", "/detokenize", DETOKENIZE), ("POST", "/detokenize/", DETOKENIZE),
    ("GET", "/v1/models", None), ("GET", "/v1/models/", None), ("GET", f"/v1/models/{MODEL}", None),
    ("POST", "/v1/completions/", COMPLETION_BODY), ("POST", "/v1/chat/completions/", CHAT_BODY),
]
# Spellings the router does not serve: 404 with or without the key, nothing leaked.
UNSERVED_FORMS = [("POST", "//tokenize", TOKENIZE), ("POST", "/tok%65nize", TOKENIZE), ("POST", "/Tokenize", TOKENIZE),
                  ("GET", "//v1/models", None), ("GET", "/v1/model%73", None), ("GET", "/x/../v1/models", None)]


@pytest.mark.parametrize("method,path,body", GUARDED_FORMS, ids=[f"{m} {p}" for m, p, _ in GUARDED_FORMS])
def test_every_route_form_needs_the_key(keyed_server: LiveServer, method: str, path: str, body: dict | None):
    r = httpx.request(method, keyed_server.url(path), json=body, timeout=60)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.request(method, keyed_server.url(path), json=body, headers=keyed_server.headers, timeout=60)
    assert r.status_code == 200 or r.json()["error"]["code"] == "model_not_found", r.text  # the handler ran


@pytest.mark.parametrize("method,path,body", UNSERVED_FORMS, ids=[f"{m} {p}" for m, p, _ in UNSERVED_FORMS])
def test_unserved_forms_are_404_either_way(keyed_server: LiveServer, method: str, path: str, body: dict | None):
    for headers in ({}, keyed_server.headers):
        status, answer = raw_request(keyed_server, f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                     f"application/json\r\nContent-Length: {len(json.dumps(body or {}))}\r\n".encode()
                                     + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n",
                                     json.dumps(body or {}).encode())
        assert status == 404, answer
        assert json.loads(answer)["error"]["code"] == "not_found"


@pytest.mark.parametrize("path", ["/health", "/health/", "/ready", "/ready/", "/version", "/version/"])
def test_open_routes_in_every_form(keyed_server: LiveServer, path: str):
    assert httpx.get(keyed_server.url(path), timeout=10).status_code == 200


def test_default_deny_every_registered_route():
    """A route is guarded unless registered public: only the ops routes (/metrics as configured) and
    the chat page's static files are."""
    for metrics_require_key, public in ((False, {"/health", "/ping", "/ready", "/version", "/metrics"}),
                                        (True, {"/health", "/ping", "/ready", "/version"})):
        app = create_app(EngineConfig(device="cpu"), ServerConfig(metrics_require_key=metrics_require_key),
                         api_key="k")
        Sanic.unregister_app(app)  # not run: its name is free for the next one
        routes = {"/" + route.path: bool(getattr(route.ctx, "public", False)) for route in app.router.routes}
        open_routes = {path for path, is_open in routes.items() if is_open}
        page_files = {path for path in open_routes if path in ("/", "/ui") or path.startswith("/ui/")}
        assert open_routes - page_files == public
        assert "/ui/status" not in open_routes  # the page's live data is guarded like /v1
        assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"} <= set(routes)


# ---- hostile input: 400 naming the field ----

def _json(obj: dict) -> bytes:
    return json.dumps(obj).encode()


DEEP = b'{"model": "%s", "prompt": ' % MODEL.encode() + b"[" * 10_000 + b"]" * 10_000 + b"}"
HUGE_INT = b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}"
INT64_OVER = 2**63

BAD_INPUT = [
    ("deep-json", CHAT, DEEP, "body"),
    ("deep-json-completion", COMPLETIONS, DEEP, "body"),
    ("5000-digit-int", COMPLETIONS, HUGE_INT, "body"),
    ("surrogate-message", CHAT, b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}',
     "messages[0].content"),
    ("surrogate-part", CHAT, b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ("surrogate-prompt", COMPLETIONS, b'{"prompt": "hi \\ud800", "max_tokens": 2}', "prompt"),
    ("surrogate-prompt-list", COMPLETIONS, b'{"prompt": ["ok", "\\ud800"], "max_tokens": 2}', "prompt[1]"),
    ("surrogate-tokenize", "/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ("surrogate-stop", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stop": "\\ud800"}', "stop"),
    ("huge-float-int", COMPLETIONS, b'{"prompt": "Hi", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    *[(f"int64-{name}", COMPLETIONS, _json({"prompt": "Hi", "max_tokens": 2, name: value}), name)
      for name, value in [("n", INT64_OVER), ("max_tokens", INT64_OVER), ("seed", INT64_OVER), ("seed", -INT64_OVER - 1),
                          ("top_k", 1180591620717411303424), ("min_tokens", INT64_OVER), ("logprobs", -INT64_OVER - 1),
                          ("best_of", INT64_OVER), ("max_tokens", 1e300)]],
    *[(f"int64-chat-{name}", CHAT, _json({"messages": [{"role": "user", "content": "Hi"}], name: value}), name)
      for name, value in [("top_logprobs", INT64_OVER), ("max_completion_tokens", INT64_OVER), ("n", -INT64_OVER - 1)]],
    ("token-id-beyond-int64", COMPLETIONS, _json({"prompt": [1, INT64_OVER], "max_tokens": 2}), "prompt"),
    ("detokenize-too-many", "/detokenize", _json({"tokens": [1] * 5000}), "tokens"),
    *[(f"5000-digit-tool-arguments{where}", path, _json({**body, "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                              "function": {"name": "f", "arguments": "9" * 5000}}]}]}),
        "messages[1].tool_calls[0].function.arguments")
      for where, path, body in [("", CHAT, {"max_tokens": 2}), ("-tokenize", "/tokenize", {})]],
    ("tokenize-prompt-and-messages", "/tokenize",
     _json({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}), "messages"),
    ("priority-without-its-policy", COMPLETIONS, _json({"prompt": "Hi", "max_tokens": 2, "priority": 1}), "priority"),
    ("spaces-between-special-tokens-type", CHAT, _json({"messages": [{"role": "user", "content": "Hi"}],
                                                        "spaces_between_special_tokens": "no"}),
     "spaces_between_special_tokens"),
    ("add-special-tokens-type", COMPLETIONS, _json({"prompt": "Hi", "add_special_tokens": [1]}), "add_special_tokens"),
    ("surrogate-choice", COMPLETIONS,
     b'{"prompt": "Hi", "max_tokens": 2, "structured_outputs": {"choice": ["a", "\\udc00b"]}}',
     "structured_outputs.choice[1]"),
]


@pytest.mark.parametrize("path,body,field", [c[1:] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_hostile_input_is_400_naming_the_field(keyed_server: LiveServer, path: str, body: bytes, field: str):
    r = httpx.post(keyed_server.url(path), content=body, headers={**keyed_server.headers,
                                                                 "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}: "), err
    assert len(r.content) < 2000  # a client's huge value is never echoed back whole


def test_text_longer_than_the_model_can_take(keyed_server: LiveServer):
    """Refused before any tokenizing, naming the field: the bound is max_model_len x the longest token."""
    long = "x" * 200_000  # more than 1024 tokens of at most 81 characters
    cases = [(CHAT, {"messages": [{"role": "user", "content": long}]}, "messages[0].content"),
             (CHAT, {"messages": [{"role": "user", "content": long[:60_000]}] * 2}, "messages"),
             (COMPLETIONS, {"prompt": long}, "prompt"), (COMPLETIONS, {"prompt": ["Hi", long]}, "prompt[1]"),
             (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "stop": [long]}, "stop"),
             ("/tokenize", {"prompt": long}, "prompt")]
    for path, body, field in cases:
        r = httpx.post(keyed_server.url(path), json=body, headers=keyed_server.headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text[:300])
        assert "cannot fit in max_model_len (1024 tokens" in r.json()["error"]["message"]


def test_undecodable_authorization_is_400(keyed_server: LiveServer):
    body = _json(TOKENIZE)
    status, answer = raw_request(keyed_server, b"POST /tokenize HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                                 b"Connection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                 % len(body), body, half_close=False)
    assert status == 400, answer
    assert json.loads(answer)["error"]["param"] == "Authorization"


# ---- malformed HTTP framing, over raw sockets ----

def _post_head(extra: bytes) -> bytes:
    return b"POST /tokenize HTTP/1.1\r\nHost: x\r\n" + KEY_HEADER + b"Content-Type: application/json\r\n" + extra + b"\r\n"


TOKENIZE_BODY = _json(TOKENIZE)
FRAMING = [
    ("duplicate-content-length", _post_head(b"Content-Length: %d\r\nContent-Length: %d\r\n"
                                            % (len(TOKENIZE_BODY), len(TOKENIZE_BODY))), TOKENIZE_BODY, 400),
    ("content-length-and-chunked", _post_head(b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n"
                                              % len(TOKENIZE_BODY)), TOKENIZE_BODY, 400),
    ("negative-content-length", _post_head(b"Content-Length: -5\r\n"), TOKENIZE_BODY, 400),
    ("64-KiB-header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n", b"", 431),
    ("100-KiB-url", b"GET /health?q=" + b"a" * 102_400 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"", 414),
    ("nul-in-path", b"GET /hea\x00lth HTTP/1.1\r\nHost: x\r\n\r\n", b"", 400),
]


@pytest.mark.parametrize("head,body,status", [c[1:] for c in FRAMING], ids=[c[0] for c in FRAMING])
def test_malformed_framing(keyed_server: LiveServer, head: bytes, body: bytes, status: int):
    start = len(keyed_server.log())
    got, answer = raw_request(keyed_server, head, body)
    assert got == status, answer
    assert set(json.loads(answer)["error"]) == {"message", "type", "param", "code"}
    time.sleep(0.2)
    new_log = keyed_server.log()[start:]
    assert "Traceback" not in new_log and "ERROR" not in new_log, new_log


# ---- clients hanging up: INFO and an aborted count, not ERROR, not 5xx ----

def _five_xx(server: LiveServer) -> float:
    return sum(v for (name, labels), v in server.metrics().items()
               if name == "gantry:http_requests_total" and dict(labels)["status"].startswith("5"))


def _aborted(server: LiveServer) -> float:
    return sum(v for (name, _), v in server.metrics().items() if name == "gantry:http_requests_aborted_total")


def test_hangup_burst(keyed_server: LiveServer):
    """100 connections in the style of slowloris, then all hang up: partial heads, partial bodies,
    whole requests waiting for generation (plain and streaming)."""
    start, five_xx, aborted = len(keyed_server.log()), _five_xx(keyed_server), _aborted(keyed_server)
    chat = _json({**CHAT_BODY, "max_tokens": 64, "ignore_eos": True})
    stream = _json({**COMPLETION_BODY, "max_tokens": 64, "ignore_eos": True, "stream": True})
    head = b"POST %s HTTP/1.1\r\nHost: x\r\n" + KEY_HEADER + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    sends = [b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le",
             head % (CHAT.encode(), len(chat)) + chat[:10],
             head % (CHAT.encode(), len(chat)) + chat,
             head % (COMPLETIONS.encode(), len(stream)) + stream]
    t0 = time.monotonic()
    socks = []
    for i in range(100):
        s = socket.create_connection(("127.0.0.1", keyed_server.port), timeout=10)
        s.sendall(sends[i % len(sends)])
        socks.append(s)
    time.sleep(1.0)
    for s in socks:
        s.close()
    # Every connection that got as far as a request (all but the partial heads' empty stand-ins) is counted.
    deadline = time.monotonic() + 60
    while _aborted(keyed_server) - aborted < 75 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _aborted(keyed_server) - aborted >= 75
    assert time.monotonic() - t0 < 60
    assert _five_xx(keyed_server) == five_xx
    assert_idle(keyed_server)
    new_log = keyed_server.log()[start:]
    assert "ERROR" not in new_log and "Traceback" not in new_log, new_log[-3000:]
    assert new_log.count("client hung up") >= 75
