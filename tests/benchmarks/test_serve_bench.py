"""benchmarks/serve_report.py's metric arithmetic; benchmarks/serve.py's arrivals and workload, and whole runs against a
stand-in OpenAI SSE server (raw asyncio, on a free loopback port, in its own thread) that
streams with known timings; a slow test runs the CLI against `python -m engine.serve`."""
from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks import serve as bench
from benchmarks.serve import RequestSpec, RunConfig
from benchmarks.serve_client import CHAT, COMPLETIONS
from benchmarks.serve_report import RequestResult, compute_metrics
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = "standin-model"
# Timing slack for a loaded 2-core machine: the client's own lateness adds to the server's sleeps.
SLACK_S = 0.06


# ---- the stand-in server ----

@dataclass
class StandIn:
    """An OpenAI-shaped SSE server: first chunk `ttft_s` after the request, then one chunk every `itl_s`."""

    ttft_s: float = 0.08
    itl_s: float = 0.02
    tokens_per_chunk: int = 1
    api_key: str | None = None
    not_ready_polls: int = 0  # /ready answers 503 this many times first
    fail_every: int = 0  # every k-th generation request gets a 500 (0: never)
    port: int = 0
    bodies: list[dict] = field(default_factory=list)
    auth_seen: list[str | None] = field(default_factory=list)
    active: int = 0
    max_active: int = 0
    ready_polls: int = 0
    generations: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: bytes,
                    ctype: str = "application/json") -> None:
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 500: "Internal Server Error",
                  503: "Service Unavailable"}[status]
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        await writer.drain()

    async def _chunk(self, writer: asyncio.StreamWriter, data: dict | str) -> None:
        payload = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, body: dict, chat: bool) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = int(body["max_tokens"])
        prompt_tokens = len(body["prompt"]) if not chat else len(body["messages"][0]["content"].split())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        obj = "chat.completion.chunk" if chat else "text_completion"
        if chat:  # like engine/server: the role preamble goes out at once, before any token
            await self._chunk(writer, {"object": obj, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                                     "content": ""}}]})
        sent = 0
        for i in range(math.ceil(n / self.tokens_per_chunk)):
            await asyncio.sleep(max(0.0, t0 + self.ttft_s + i * self.itl_s - loop.time()))
            k = min(self.tokens_per_chunk, n - sent)
            sent += k
            finish = "length" if sent == n else None
            text = "tok " * k
            choice = ({"index": 0, "delta": {"content": text}, "finish_reason": finish} if chat
                      else {"index": 0, "text": text, "finish_reason": finish})
            await self._chunk(writer, {"object": obj, "model": MODEL, "choices": [choice], "usage": None})
        await self._chunk(writer, {"object": obj, "model": MODEL, "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}})
        await self._chunk(writer, "[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(10_000):  # keep-alive: one request per pass
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                raw = await reader.readexactly(int(headers.get("content-length", "0")))
                await self.route(writer, method, path, headers, raw)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def route(self, writer: asyncio.StreamWriter, method: str, path: str, headers: dict[str, str],
                    raw: bytes) -> None:
        if path == "/ready":
            self.ready_polls += 1
            ok = self.ready_polls > self.not_ready_polls
            await self._send(writer, 200 if ok else 503, b'{"status": "ready"}' if ok else b"{}")
            return
        auth = headers.get("authorization")
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            await self._send(writer, 401, b'{"error": {"message": "invalid or missing API key"}}')
            return
        if path == "/v1/models" and method == "GET":
            await self._send(writer, 200, json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())
            return
        if path == "/detokenize":
            text = " ".join(f"w{t}" for t in json.loads(raw)["tokens"])
            await self._send(writer, 200, json.dumps({"prompt": text}).encode())
            return
        if path not in (COMPLETIONS, CHAT):
            await self._send(writer, 404, b"{}")
            return
        body = json.loads(raw)
        self.bodies.append(body)
        self.auth_seen.append(auth)
        self.generations += 1
        if self.fail_every and self.generations % self.fail_every == 0:
            await self._send(writer, 500, b'{"error": {"message": "boom"}}')
            return
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self._stream(writer, body, chat=path == CHAT)
        finally:
            self.active -= 1


@pytest.fixture
def standin() -> Iterator[StandIn]:
    """A StandIn serving on 127.0.0.1 (a free port) from its own thread and event loop."""
    server = StandIn()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = srv.sockets[0].getsockname()[1]
        holder["srv"] = srv
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    yield server

    async def stop() -> None:
        holder["srv"].close()
        await holder["srv"].wait_closed()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def run(specs: list[RequestSpec], server: StandIn, **cfg: Any) -> dict[str, Any]:
    return asyncio.run(bench.run_benchmark(specs, RunConfig(base_url=server.base_url, model=MODEL, **cfg)))


def fixed(num: int, input_len: int = 10, output_len: int = 6) -> list[RequestSpec]:
    return bench.sample_random_requests(num, input_len, output_len, 0.0, 1000, seed=1)


# ---- pure arithmetic ----

def test_compute_metrics_exact():
    results = [
        RequestResult(success=True, prompt_tokens=10, output_tokens=5, usage_reported=True, ttft=0.1, latency=0.5,
                      itl=[0.1, 0.1, 0.1, 0.1]),
        RequestResult(success=True, prompt_tokens=20, output_tokens=3, usage_reported=True, ttft=0.3, latency=0.7,
                      itl=[0.2, 0.2]),
        RequestResult(success=True, prompt_tokens=5, output_tokens=1, usage_reported=True, ttft=0.2, latency=0.2),
        RequestResult(success=False, error="HTTP 500: boom", prompt_tokens=99, output_tokens=99, latency=0.01),
    ]
    m = compute_metrics(results, duration=2.0, percentiles=(50, 90, 99))
    assert (m["completed"], m["failed"]) == (3, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (35, 9)  # the failed one counts nothing
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["input_throughput"] == pytest.approx(17.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(22.0)
    assert m["ttft_ms"]["mean"] == pytest.approx(200.0) and m["ttft_ms"]["median"] == pytest.approx(200.0)
    assert m["ttft_ms"]["p90"] == pytest.approx(280.0)  # linear interpolation over [100, 200, 300]
    # TPOT per request excludes the first token: (0.5-0.1)/4 = 0.1, (0.7-0.3)/2 = 0.2; one-token requests have none.
    assert m["tpot_ms"]["mean"] == pytest.approx(150.0)
    assert m["tpot_ms"]["p99"] == pytest.approx(199.0)
    # ITL pools every gap of every request: four of 100 ms and two of 200 ms.
    assert m["itl_ms"]["mean"] == pytest.approx(800 / 6) and m["itl_ms"]["median"] == pytest.approx(100.0)
    assert m["e2el_ms"]["mean"] == pytest.approx(1400 / 3) and m["e2el_ms"]["p50"] == pytest.approx(500.0)
    assert m["errors"] == ["HTTP 500: boom"] and m["usage_missing"] == 0


def test_compute_metrics_empty_run():
    m = compute_metrics([RequestResult(error="x")], duration=1.0)
    assert m["completed"] == 0 and m["failed"] == 1 and m["request_throughput"] == 0
    assert m["ttft_ms"] == {"mean": 0.0, "median": 0.0, "std": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}


def test_arrivals_poisson_gamma_and_inf():
    assert bench.arrival_offsets(5, math.inf, 1.0, seed=0) == [0.0] * 5
    assert bench.arrival_offsets(0, 3.0, 1.0, seed=0) == []
    for burstiness, cv in ((1.0, 1.0), (4.0, 0.5), (0.25, 2.0)):  # gamma: CV = 1/sqrt(shape)
        offsets = bench.arrival_offsets(20_001, 10.0, burstiness, seed=3)
        assert offsets[0] == 0.0 and offsets == sorted(offsets)
        gaps = np.diff(offsets)
        assert gaps.mean() == pytest.approx(0.1, rel=0.05)  # 1 / rate whatever the burstiness
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    assert bench.arrival_offsets(50, 2.0, 1.0, seed=7) == bench.arrival_offsets(50, 2.0, 1.0, seed=7)
    with pytest.raises(ValueError):
        bench.arrival_offsets(3, 0.0, 1.0, seed=0)


def test_random_workload_lengths_and_ids():
    specs = bench.sample_random_requests(200, 100, 40, 0.5, vocab_size=500, seed=0)
    assert all(50 <= s.prompt_len <= 150 and len(s.prompt) == s.prompt_len for s in specs)
    assert all(20 <= s.output_len <= 60 for s in specs)
    assert all(0 <= t < 500 for s in specs for t in s.prompt)
    assert len({s.prompt_len for s in specs}) > 10
    assert specs == bench.sample_random_requests(200, 100, 40, 0.5, vocab_size=500, seed=0)
    same = bench.sample_random_requests(20, 64, 8, 0.0, vocab_size=500, seed=1)
    assert {(s.prompt_len, s.output_len) for s in same} == {(64, 8)}
    with pytest.raises(ValueError):
        bench.sample_random_requests(2, 10, 10, 1.0, vocab_size=500, seed=0)


# ---- against the stand-in ----

@pytest.mark.exclusive  # millisecond timing bounds
def test_known_timings_all_at_once(standin: StandIn):
    specs = fixed(8, input_len=10, output_len=6)
    out = run(specs, standin)
    m = out["metrics"]
    assert (m["completed"], m["failed"]) == (8, 0)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (80, 48)
    e2e = standin.ttft_s + 5 * standin.itl_s  # 0.18 s: first chunk at ttft, five more itl apart
    for r in out["requests"]:
        assert standin.ttft_s <= r.ttft < standin.ttft_s + SLACK_S
        assert len(r.itl) == 5
        assert e2e <= r.latency < e2e + SLACK_S
    assert m["ttft_ms"]["median"] == pytest.approx(1000 * standin.ttft_s, abs=1000 * SLACK_S)
    assert m["itl_ms"]["median"] == pytest.approx(1000 * standin.itl_s, abs=12)
    assert m["itl_ms"]["mean"] == pytest.approx(1000 * standin.itl_s, abs=12)
    assert m["tpot_ms"]["mean"] == pytest.approx(1000 * standin.itl_s, abs=10)
    assert m["e2el_ms"]["p50"] == pytest.approx(1000 * e2e, abs=1000 * SLACK_S)
    # Everything went at once: the run lasts one request, throughputs follow from the duration.
    assert e2e <= m["duration_s"] < e2e + 2 * SLACK_S
    assert m["request_throughput"] == pytest.approx(8 / m["duration_s"])
    assert m["output_throughput"] == pytest.approx(48 / m["duration_s"])
    assert m["input_throughput"] == pytest.approx(80 / m["duration_s"])
    assert m["peak_concurrency"] == 8 and standin.max_active == 8
    # The requests: token-id prompts, a fixed output length, streamed with usage.
    for body, spec in zip(sorted(standin.bodies, key=lambda b: b["prompt"]), sorted(specs, key=lambda s: s.prompt),
                          strict=True):
        assert body["prompt"] == spec.prompt and body["max_tokens"] == 6 and body["ignore_eos"] is True
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["model"] == MODEL


@pytest.mark.exclusive  # millisecond timing bounds
def test_tokens_counted_from_usage_not_chunks(standin: StandIn):
    standin.tokens_per_chunk = 3  # 6 tokens in 2 chunks
    out = run(fixed(3, output_len=6), standin)
    m = out["metrics"]
    assert m["total_output_tokens"] == 18 and m["usage_missing"] == 0
    assert all(len(r.itl) == 1 and r.output_tokens == 6 for r in out["requests"])
    # TPOT spreads the time after the first chunk over the 5 later tokens: one itl / 5.
    assert m["tpot_ms"]["mean"] == pytest.approx(1000 * standin.itl_s / 5, abs=10)
    assert m["itl_ms"]["mean"] == pytest.approx(1000 * standin.itl_s, abs=12)


@pytest.mark.exclusive  # millisecond timing bounds
def test_max_concurrency_caps_in_flight(standin: StandIn):
    out = run(fixed(9, output_len=3), standin, max_concurrency=3)
    m = out["metrics"]
    assert m["completed"] == 9 and standin.max_active == 3 and m["peak_concurrency"] == 3
    e2e = standin.ttft_s + 2 * standin.itl_s
    assert 3 * e2e <= m["duration_s"] < 3 * e2e + 4 * SLACK_S  # three waves of three


@pytest.mark.exclusive  # millisecond timing bounds
def test_poisson_sends_on_schedule(standin: StandIn):
    rate, n = 25.0, 12
    out = run(fixed(n, output_len=2), standin, request_rate=rate, seed=5)
    expected = bench.arrival_offsets(n, rate, 1.0, seed=5)
    sent = [r.send_time for r in out["requests"]]  # in spec order
    assert all(e <= s < e + 0.05 for e, s in zip(expected, sent, strict=True)), (expected, sent)
    assert out["metrics"]["duration_s"] >= expected[-1] + standin.ttft_s + standin.itl_s


def test_chat_ignores_the_role_preamble(standin: StandIn):
    specs = [RequestSpec("w1 w2 w3 w4", 4, 5), RequestSpec("w5 w6", 2, 5)]
    out = run(specs, standin, endpoint=CHAT)
    m = out["metrics"]
    assert m["completed"] == 2 and m["total_input_tokens"] == 6 and m["total_output_tokens"] == 10
    assert m["ttft_ms"]["mean"] >= 1000 * standin.ttft_s  # not the instant role chunk
    assert all(len(r.itl) == 4 for r in out["requests"])
    assert standin.bodies[0]["messages"][0]["role"] == "user" and "prompt" not in standin.bodies[0]


def test_failures_and_api_key(standin: StandIn):
    standin.api_key = "sekrit"
    out = run(fixed(4), standin)  # no key
    assert out["metrics"]["failed"] == 4 and out["metrics"]["errors"][0].startswith("HTTP 401")
    standin.fail_every = 3
    standin.generations = 0
    out = run(fixed(6), standin, api_key="sekrit")
    m = out["metrics"]
    assert (m["completed"], m["failed"]) == (4, 2) and m["errors"][0].startswith("HTTP 500")
    assert m["total_output_tokens"] == 4 * 6
    assert standin.auth_seen[-1] == "Bearer sekrit"


def test_unreachable_server_is_a_failure_not_a_crash():
    port = free_port()  # nothing listens on it
    out = asyncio.run(bench.run_benchmark(fixed(2), RunConfig(base_url=f"http://127.0.0.1:{port}", model=MODEL)))
    assert out["metrics"]["failed"] == 2 and "ConnectError" in out["metrics"]["errors"][0]


def test_cli_sweep_waits_ready_and_writes_json(standin: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture):
    standin.not_ready_polls = 2
    standin.api_key = "k1"
    out = tmp_path / "sweep.json"
    code = bench.main(["--base-url", standin.base_url, "--api-key", "k1", "--num-prompts", "6",
                       "--random-input-len", "12", "--random-output-len", "4", "--vocab-size", "900",
                       "--request-rates", "40,inf", "--result-json", str(out), "--save-requests",
                       "--ready-timeout", "10"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert standin.ready_polls == 3  # two 503s, then ready
    assert "Serving Benchmark Result" in text and "TTFT p50" in text  # per-run blocks, then the table
    report = json.loads(out.read_text())
    assert report["config"]["model"] == MODEL and "api_key" not in report["config"]
    assert report["command"].startswith("python -m benchmarks.serve --base-url") and "k1" not in report["command"]
    assert [r["request_rate"] for r in report["runs"]] == [40.0, "inf"]
    for r in report["runs"]:
        assert r["metrics"]["completed"] == 6 and r["metrics"]["total_output_tokens"] == 24
        assert r["metrics"]["total_input_tokens"] == 72 and len(r["requests"]) == 6
    assert len(standin.bodies) == 1 + 2 * 6  # one warm-up, then two runs
    assert all(max(b["prompt"]) < 900 for b in standin.bodies)


def test_cli_find_peak_runs_at_half_the_peak(standin: StandIn, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "peak.json"
    code = bench.main(["--base-url", standin.base_url, "--num-prompts", "8", "--random-input-len", "8",
                       "--random-output-len", "3", "--vocab-size", "500", "--find-peak", "--num-warmups", "0",
                       "--result-json", str(out)])
    assert code == 0, capsys.readouterr().out
    report = json.loads(out.read_text())
    first, second = report["runs"]
    peak = report["peak"]
    assert first["request_rate"] == "inf"
    assert peak["peak_request_throughput"] == pytest.approx(first["metrics"]["request_throughput"])
    assert second["request_rate"] == pytest.approx(0.5 * peak["peak_request_throughput"])
    assert second["metrics"]["completed"] == 8
    assert "requests" not in second  # per-request timings only with --save-requests


def test_cli_not_ready_times_out(standin: StandIn, capsys: pytest.CaptureFixture):
    standin.not_ready_polls = 10**6
    code = bench.main(["--base-url", standin.base_url, "--ready-timeout", "1", "--num-prompts", "1"])
    assert code == 1 and "/ready not 200" in capsys.readouterr().err


# ---- end to end against the real server ----

@pytest.mark.slow
def test_end_to_end_against_engine_serve(tmp_path: Path):
    """`python -m engine.serve` (embedded SmolLM2 on CPU) under a short Poisson load and a chat run."""
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "engine.serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--max-model-len", "128", "--num-kv-blocks", "256", "--max-num-seqs", "16"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = ["--base-url", f"http://127.0.0.1:{port}", "--ready-timeout", "300", "--random-input-len", "16",
                "--random-output-len", "6", "--vocab-size", "49152"]
        out = tmp_path / "e2e.json"
        assert bench.main([*base, "--num-prompts", "6", "--request-rate", "4", "--result-json", str(out)]) == 0, \
            log.read_text()[-3000:]
        m = json.loads(out.read_text())["runs"][0]["metrics"]
        assert m["completed"] == 6 and m["failed"] == 0 and m["usage_missing"] == 0
        assert m["total_input_tokens"] == 6 * 16 and m["total_output_tokens"] == 6 * 6  # ignore_eos, exact
        assert 0 < m["ttft_ms"]["p50"] <= m["e2el_ms"]["p50"] and m["tpot_ms"]["mean"] > 0 and m["itl_ms"]["p99"] > 0
        chat = tmp_path / "chat.json"
        assert bench.main([*base, "--endpoint", CHAT, "--num-prompts", "2", "--max-concurrency", "2",
                           "--num-warmups", "0", "--result-json", str(chat)]) == 0
        m = json.loads(chat.read_text())["runs"][0]["metrics"]
        assert m["completed"] == 2 and m["total_output_tokens"] == 12 and m["total_input_tokens"] > 2 * 6
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.exclusive  # millisecond timing bounds
def test_client_processes_split_the_requests_and_keep_the_timings(standin: StandIn):
    """--client-processes 3: every request sent once, from three processes at one common instant,
    with the same per-request timings and run metrics as one loop would measure."""
    specs = fixed(9, input_len=10, output_len=6)
    out = run(specs, standin, client_processes=3)
    m = out["metrics"]
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (9, 0, 54)
    assert sorted(b["prompt"] for b in standin.bodies) == sorted(s.prompt for s in specs)
    e2e = standin.ttft_s + 5 * standin.itl_s
    for r in out["requests"]:
        assert len(r.itl) == 5 and standin.ttft_s <= r.ttft < standin.ttft_s + SLACK_S
        assert r.send_time < SLACK_S  # all at the common start
    assert m["itl_ms"]["median"] == pytest.approx(1000 * standin.itl_s, abs=12)
    assert e2e <= m["duration_s"] < e2e + 2 * SLACK_S
    assert m["peak_concurrency"] == 9 and standin.max_active == 9
