"""HTTP client side of benchmarks/serve.py: one streaming request to an OpenAI-compatible server, timed.

build_payload makes a /v1/completions or /v1/chat/completions body whose output length is fixed
(max_tokens with ignore_eos, usage streamed); send_request POSTs it on a pooled httpx client
(make_client) and records TTFT, every inter-chunk gap (ITL), E2E latency and the server's token
counts into a RequestResult. Shared by the run loop of benchmarks/serve.py and the client
processes of benchmarks/serve_clients.py."""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import httpx

from benchmarks.serve_report import RequestResult

if TYPE_CHECKING:
    from benchmarks.serve import RequestSpec

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def build_payload(endpoint: str, model: str, spec: RequestSpec, temperature: float,
                  extra_body: dict[str, Any] | None) -> dict[str, Any]:
    """A streaming request whose output length is fixed: max_tokens with ignore_eos."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.output_len,
        "ignore_eos": True,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == CHAT:
        content = spec.prompt if isinstance(spec.prompt, str) else " ".join(map(str, spec.prompt))
        body["messages"] = [{"role": "user", "content": content}]
    else:
        body["prompt"] = spec.prompt
    body.update(extra_body or {})
    return body


def _generated(chunk: dict[str, Any], chat: bool) -> bool:
    """Whether an SSE chunk carries generated output (not the chat role preamble, not usage alone)."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    if not chat:
        return True
    for c in choices:
        delta = c.get("delta") or {}
        if delta.get("content") or c.get("finish_reason") is not None or c.get("logprobs"):
            return True
    return False


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                       headers: dict[str, str], chat: bool) -> RequestResult:
    """POST one streaming request and time its chunks; never raises for server or network errors."""
    result = RequestResult(output_len=int(payload.get("max_tokens") or 0))
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return result
                if _generated(chunk, chat):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                usage = chunk.get("usage")
                if usage:
                    result.usage_reported = True
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    result.output_tokens = int(usage.get("completion_tokens") or 0)
            result.latency = time.perf_counter() - start
            if not done:
                result.error = "stream ended without data: [DONE]"
            elif chunks == 0:
                result.error = "no generated chunk in the stream"
            else:
                if not result.usage_reported:  # a server without include_usage: fall back to chunk counts
                    result.output_tokens = chunks
                result.success = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
        result.latency = time.perf_counter() - start
    return result


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def make_client(timeout_s: float, max_connections: int | None = None) -> httpx.AsyncClient:
    """One pooled client for every request of a run; no connection cap unless asked."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        trust_env=False)
