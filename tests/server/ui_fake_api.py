"""A scripted stand-in for the API behind the chat page (stdlib HTTP server on loopback). It serves
the page's real files with their real headers and streams fixed answers, so the browser test can
check what the embedded model cannot be made to say: reasoning_content, HTML and javascript: links
in the answer, UTF-8 characters cut between network writes, LoRA adapters, an error mid-stream."""
from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from engine.server.ui_routes import SECURITY_HEADERS, load_assets

FAKE_MODEL = "fake-base"
FAKE_ADAPTER = "fake-lora-sql"
XSS_ANSWER = ("<script>window.__xss = 1</script> and <img src=x onerror=\"window.__xss = 2\"> and "
              "[click me](javascript:window.__xss=3) and [safe](https://example.org/docs) and **bold** and "
              "`<b>code</b>`\n\n```html\n<b>not bold</b>\n```\n\n- one\n- two <i>x</i>\n")
MARKDOWN_ANSWER = ("# Title\n\nSee https://example.org/a_b. and [data](data:text/html,<b>x</b>)\n\n"
                   "> quoted *text*\n\n3. three\n4. four\n   - nested\n\n| a | b |\n|---|:-:|\n| 1 | `2` |\n\n"
                   "---\n```python\nprint('unclosed fence')\n")
REASONING = ["The user asks ", "for the answer. <b>Think</b> ", "step by step."]
CHINESE = "你好，世界！大型语言模型一次生成一个词元。"
PARTIAL_BEFORE_ERROR = "Half an answer"
ERROR_MESSAGE = "the engine failed: injected <b>error</b>"


def _chunk(delta: dict[str, Any] | None = None, usage: dict[str, int] | None = None,
           finish_reason: str | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": FAKE_MODEL,
                            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n\n"


def script(prompt: str) -> Iterator[bytes]:
    """The network writes of the streamed answer to `prompt`'s last user message."""
    yield _chunk({"role": "assistant", "content": ""})
    if prompt == "reasoning":
        for piece in REASONING:
            yield _chunk({"reasoning_content": piece})
        yield _chunk({"content": "The answer is **42**."})
    elif prompt == "xss":
        for i in range(0, len(XSS_ANSWER), 7):
            yield _chunk({"content": XSS_ANSWER[i:i + 7]})
    elif prompt == "chinese":
        for ch in CHINESE:  # each event cut one byte into its character: the page must not decode halves
            event = _chunk({"content": ch})
            cut = event.index(ch.encode("utf-8")) + 1
            yield event[:cut]
            yield event[cut:]
    elif prompt == "error":
        yield _chunk({"content": PARTIAL_BEFORE_ERROR})
        yield b"data: " + json.dumps({"error": {"message": ERROR_MESSAGE, "type": "server_error"}}).encode() + b"\n\n"
        return
    elif prompt == "markdown":
        yield _chunk({"content": MARKDOWN_ANSWER}, finish_reason="stop")
    elif prompt == "long":
        yield _chunk({"content": "cut at max_tokens"}, finish_reason="length")
    else:
        yield _chunk({"content": f"echo: {prompt}"}, finish_reason="stop")
    yield _chunk(usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18})
    yield b"data: [DONE]\n\n"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    assets = load_assets()

    def log_message(self, *args: Any) -> None:  # quiet: pytest shows failures, not access logs
        pass

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        name = "index.html" if self.path in ("/", "/ui") else self.path.removeprefix("/ui/")
        if self.path == "/v1/models":
            data = [{"id": FAKE_MODEL, "object": "model", "parent": None, "max_model_len": 4096},
                    {"id": FAKE_ADAPTER, "object": "model", "parent": FAKE_MODEL, "max_model_len": 4096}]
            self._send(200, json.dumps({"object": "list", "data": data}).encode(), "application/json")
        elif self.path == "/ui/status":
            status = {"status": "ready", "model": FAKE_MODEL, "max_model_len": 4096, "num_requests_running": 0,
                      "num_requests_waiting": 0, "kv_cache_usage": 0.0}
            self._send(200, json.dumps(status).encode(), "application/json")
        elif name in self.assets:
            asset = self.assets[name]
            self._send(200, asset.body, asset.content_type, SECURITY_HEADERS)
        else:
            self._send(404, b'{"error": {"message": "not found"}}', "application/json")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)  # type: ignore[attr-defined]
        prompt = body["messages"][-1]["content"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in script(prompt):
            self.wfile.write(piece)
            self.wfile.flush()
            time.sleep(0.03)  # separate network reads in the browser
        self.close_connection = True


class FakeAPI:
    """The stand-in on a free loopback port, in a daemon thread; .requests: the chat bodies received."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.requests = []  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.server.requests  # type: ignore[attr-defined]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
