"""An operator's probes of the server's life (Docker, Kubernetes, Slurm) and of /metrics (Prometheus):
the counters count what clients sent and nothing else, TTFT is observed when the first token comes,
a second SIGTERM cuts the grace period, --port 0 is one port for every API process, an API process's
death ends the other's streams cleanly, a stop while starting or loading is quick and leaves nothing, and
a SIGTERM after the engine core died still exits non-zero.
Each test failed before its fix (found by probing a live server)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, launch, wait_ready

COUNTERS = ("gantry:prompt_tokens_total", "gantry:generation_tokens_total", "gantry:prefix_cache_queries_total")


def _events(server: LiveServer, body: dict, lines: list[str], first: threading.Event | None = None) -> None:
    """A streamed completion's data lines, appended as they come (an error ends them with 'EXC ...')."""
    try:
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    if first is not None:
                        first.set()
    except httpx.HTTPError as e:
        lines.append(f"EXC {type(e).__name__}: {e}")


def _delta(after: dict, before: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


# ---- /metrics and signals on one server -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = wait_ready(launch(tmp_path_factory.mktemp("lifecycle"), "--max-model-len", "1024",
                          "--shutdown-grace-s", "60"))
    s.initial = s.metrics()  # before any request
    yield s
    s.stop()


def test_warm_up_is_not_counted(server: LiveServer) -> None:
    """The core's warm-up request (4 prompt tokens, 2 generated) was in prompt/generation_tokens_total."""
    assert {name: server.initial.get((name, ())) for name in COUNTERS} == dict.fromkeys(COUNTERS, 0.0)


def test_request_success_series_exist_from_the_start(server: LiveServer) -> None:
    """As vLLM: every finished_reason series exists at 0, so rate() and increase() see the first request."""
    for reason in ("stop", "length", "abort"):
        assert server.initial.get(("gantry:request_success_total", (("finished_reason", reason),))) == 0.0, reason


def test_counts_equal_what_was_sent(server: LiveServer) -> None:
    server.wait_idle()
    before = server.metrics()
    prompt = completion = 0
    for i in range(3):
        r = httpx.post(server.url("/v1/completions"), json={"model": MODEL, "prompt": f"Number {i} is",
                                                            "max_tokens": 4, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        prompt, completion = prompt + r.json()["usage"]["prompt_tokens"], completion + r.json()["usage"]["completion_tokens"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    usage = chunks[-1]["usage"]
    prompt, completion = prompt + usage["prompt_tokens"], completion + usage["completion_tokens"]
    after = server.wait_idle()
    assert _delta(after, before, "gantry:prompt_tokens_total") == prompt
    assert _delta(after, before, "gantry:generation_tokens_total") == completion == 15
    assert _delta(after, before, "gantry:request_success_total", finished_reason="length") == 4
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert _delta(after, before, f"gantry:{histogram}_count") == 4, histogram
    assert _delta(after, before, "gantry:inter_token_latency_seconds_count") == completion - 4
    # vLLM's per-request histograms: each request once, their sums what usage said
    assert _delta(after, before, "gantry:request_prompt_tokens_sum") == prompt
    assert _delta(after, before, "gantry:request_generation_tokens_sum") == completion
    assert _delta(after, before, "gantry:request_params_max_tokens_sum") == 3 * 4 + 3
    for histogram in ("request_prompt_tokens", "request_params_n", "request_prefill_time_seconds",
                      "request_decode_time_seconds", "request_inference_time_seconds"):
        assert _delta(after, before, f"gantry:{histogram}_count") == 4, histogram
    assert after[("gantry:num_requests_running", ())] == 0


def test_prompt_tokens_count_cache_hits(server: LiveServer) -> None:
    """vllm:prompt_tokens_total counts every prompt token of every request, cached or not (the prefix
    cache has its own queries/hits counters); hits were left out, so prompt tokens/s fell as the cache warmed."""
    server.wait_idle()
    before = server.metrics()
    body = {"model": MODEL, "prompt": "The same long preamble, word for word, again and again. " * 6 + "Go",
            "max_tokens": 2, "ignore_eos": True}
    prompt = 0
    for _ in range(2):
        r = httpx.post(server.url("/v1/completions"), json=body, timeout=60)
        assert r.status_code == 200, r.text
        prompt += r.json()["usage"]["prompt_tokens"]
    after = server.wait_idle()
    assert _delta(after, before, "gantry:prefix_cache_hits_total") > 0  # the second request hit the cache
    assert _delta(after, before, "gantry:prompt_tokens_total") == prompt
    assert _delta(after, before, "gantry:request_prompt_tokens_sum") == prompt  # whole, cached prefix too


def test_ttft_is_observed_at_the_first_token(server: LiveServer) -> None:
    """vLLM observes TTFT when the first token comes; it was observed when the request ended, so a long
    stream's TTFT reached Prometheus minutes late. A client that hangs up: running back to 0, one abort."""
    before = server.metrics()
    body = {"model": MODEL, "prompt": "Tell a long story", "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 5
        while _delta(server.metrics(), before, "gantry:time_to_first_token_seconds_count") == 0:
            assert time.monotonic() < deadline, "no TTFT observation while the stream runs"
            time.sleep(0.1)
        during = server.metrics()
        assert during[("gantry:num_requests_running", ())] == 1
        assert _delta(during, before, "gantry:e2e_request_latency_seconds_count") == 0  # still running
    after = server.wait_idle()
    assert after[("gantry:num_requests_running", ())] == 0
    assert _delta(after, before, "gantry:time_to_first_token_seconds_count") == 1
    assert _delta(after, before, "gantry:e2e_request_latency_seconds_count") == 1
    assert _delta(after, before, "gantry:request_success_total", finished_reason="abort") == 1
    # vLLM's per-request histograms count what the engine finished: not a request its client left
    for histogram in ("request_prompt_tokens", "request_generation_tokens", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_inference_time_seconds"):
        assert _delta(after, before, f"gantry:{histogram}_count") == 0, histogram
    # its HTTP request too: it was counted as a 200 (the stream's head had gone out), not as aborted
    route = (("method", "POST"), ("route", "/v1/completions"))
    assert _delta(after, before, "gantry:http_requests_aborted_total", **dict(route)) == 1
    assert _delta(after, before, "gantry:http_requests_total", **dict(route), status="200") == 0


def test_finished_stream_counts_as_200(server: LiveServer) -> None:
    before = server.metrics()
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as r:
        assert r.status_code == 200 and list(r.iter_lines())[-2] == "data: [DONE]"
    labels = {"method": "POST", "route": "/v1/completions"}
    deadline = time.monotonic() + 5  # counted when its handler returns, just after the last byte
    while _delta(after := server.metrics(), before, "gantry:http_requests_total", **labels, status="200") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _delta(after, before, "gantry:http_requests_total", **labels, status="200") == 1
    assert _delta(after, before, "gantry:http_requests_aborted_total", **labels) == 0


def test_stream_hung_up_before_its_first_chunk_counts_once(server: LiveServer) -> None:
    """Hung up while its prompt is computed (no chunk went out yet): the error handler counted it, and
    the end of its connection counted it again."""
    warm_up = {"model": MODEL, "prompt": "other " * 900, "max_tokens": 1}  # starts the text workers (large bodies)
    assert httpx.post(server.url("/v1/completions"), json=warm_up, timeout=60).status_code == 200
    server.wait_idle()
    before = server.metrics()
    body = json.dumps({"model": MODEL, "prompt": "word " * 900, "max_tokens": 5, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        time.sleep(1.0)  # submitted; on a CPU its 900-token prefill takes longer (on a GPU: a hang-up mid-stream)
    after = server.wait_idle()
    labels = {"method": "POST", "route": "/v1/completions"}
    assert _delta(after, before, "gantry:http_requests_aborted_total", **labels) == 1
    assert _delta(after, before, "gantry:http_requests_total", **labels, status="200") == 0
    assert _delta(after, before, "gantry:request_success_total", finished_reason="abort") == 1


def test_second_sigterm_cuts_the_grace_period(server: LiveServer) -> None:
    """Last in this group: it stops the server. docker stop twice (or scancel twice) must not wait out a
    60 s grace period; the second SIGTERM was ignored while a SIGINT was not."""
    lines: list[str] = []
    first = threading.Event()
    body = {"model": MODEL, "prompt": "Write a very long story:", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    t = threading.Thread(target=_events, args=(server, body, lines, first))
    t.start()
    assert first.wait(60)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log()[-3000:]
    t.join(10)
    assert time.monotonic() - start < 15
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "abort", lines[-3:]
    assert "Traceback" not in server.log()


# ---- two API processes on --port 0 --------------------------------------------------------------------

LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+) ")


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory):
    s = launch(tmp_path_factory.mktemp("two-port0"), "--api-server-count", "2", "--max-model-len", "1024",
               "--port", "0")  # the last --port wins
    deadline = time.monotonic() + 240
    while len(LISTENING.findall(s.log())) < 2 and s.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    s.ports = [int(p) for p in LISTENING.findall(s.log())]
    if s.ports and s.ports[0]:
        s.port = s.ports[0]
        wait_ready(s)
    yield s
    s.stop()


def test_port_0_is_one_port_for_every_api_process(two: LiveServer) -> None:
    """--port 0 logged 'listening on ...:0', and API process 1 bound a port of its own: half the server
    was unreachable at the port the operator could not learn anyway."""
    assert len(two.ports) == 2 and two.ports[0] != 0 and two.ports[0] == two.ports[1], two.log()[-3000:]
    assert httpx.get(two.url("/ready"), timeout=10).status_code == 200


def _serving_pid(port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of pids holds the server end of the TCP connection 127.0.0.1:client_port -> port."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(a.split(":")[1], 16) for a in fields[1:3])
        if local == port and remote == client_port:
            inode = fields[9]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


def test_death_of_an_api_process_ends_the_others_streams(two: LiveServer) -> None:
    """Last in this group. SIGKILL of API process 1: process 0 stops the server (exit 1) and its own streams
    end with a final chunk; they were cut mid-body, and the abort sent after the sockets closed was logged
    as 'cannot send to the engine core'."""
    children = [int(p) for p in re.search(r"share the port \(pids ([\d, ]+)\)", two.log())[1].split(", ")][1:]
    body = {"model": MODEL, "prompt": "Write a very long story:", "max_tokens": 900, "ignore_eos": True}
    lines: list[str] = []
    for _ in range(20):  # new connections until one lands on API process 0 (the kernel picks)
        client = httpx.Client(timeout=120)
        r = client.send(client.build_request("POST", two.url("/v1/completions"), json={**body, "stream": True}),
                        stream=True)
        client_port = r.extensions["network_stream"].get_extra_info("socket").getsockname()[1]
        if _serving_pid(two.port, client_port, [two.proc.pid, *children]) == two.proc.pid:
            break
        r.close()
        client.close()
    else:
        pytest.fail("no connection reached API process 0")

    def read() -> None:
        try:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
        except httpx.HTTPError as e:
            lines.append(f"EXC {type(e).__name__}: {e}")

    t = threading.Thread(target=read)
    t.start()
    time.sleep(1.0)
    os.kill(children[0], signal.SIGKILL)
    assert two.proc.wait(30) == 1, two.log()[-3000:]
    t.join(10)
    client.close()
    assert lines[-1] == "[DONE]", lines[-3:]
    assert "cannot send to the engine core" not in two.log() and "Traceback" not in two.log(), two.log()[-3000:]


# ---- stopping while starting, and a model that cannot load -------------------------------------------


def _core_pids(server: LiveServer) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(server.proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_sigterm_while_loading_does_not_wait_for_the_load(tmp_path: Path) -> None:
    """SIGTERM once listening, model still loading: the server waited for the whole load (the core reads
    SHUTDOWN only once loaded; up to 20 s, then a kill) - longer than docker stop's 10 s."""
    s = launch(tmp_path, "--max-model-len", "1024")
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in s.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        cores = _core_pids(s)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0, s.log()[-3000:]
        waited = time.monotonic() - start
        assert "ready: model" not in s.log(), "loaded before the signal: the test proves nothing"
        assert waited < 4, (waited, s.log()[-3000:])
        assert not [p for p in cores if Path(f"/proc/{p}").exists()]
        assert "Traceback" not in s.log() and "Task was destroyed" not in s.log(), s.log()[-3000:]
    finally:
        s.stop()


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_while_importing_stops_cleanly(tmp_path: Path, signum: int, code: int) -> None:
    """Before Sanic handles signals (imports, checks): SIGTERM killed the process by the signal (143), with no
    word in the log, and left its socket directory behind (and the metrics one with several API processes)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    s = launch(tmp_path, "--api-server-count", "2", env={"TMPDIR": str(tmp)})
    try:
        deadline = time.monotonic() + 30
        while not _core_pids(s) and time.monotonic() < deadline:  # the core started: the directories exist
            time.sleep(0.01)
        assert "listening on" not in s.log()
        s.proc.send_signal(signum)
        assert s.proc.wait(30) == code, s.log()[-3000:]
        assert f"{signal.Signals(signum).name} while starting: stopped" in s.log(), s.log()[-3000:]
        assert not list(tmp.glob("gantry-*")), list(tmp.iterdir())
    finally:
        s.stop()


def test_a_model_without_tokenizer_fails_without_traceback(tmp_path: Path) -> None:
    """A directory with config.json, broken weights and no tokenizer: exit 2 naming the file, as before, but
    the tokenizer's error was also logged as 'Future exception was never retrieved' with a traceback, and
    'Task was destroyed but it is pending!' twice."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "torch_dtype": "float32"}))
    (model / "model.safetensors").write_bytes(b"not safetensors")
    s = launch(tmp_path, "--model", str(model), "--max-model-len", "256")
    try:
        assert s.proc.wait(120) == 2, s.log()[-3000:]
        log = s.log()
        assert "model.safetensors" in log, log[-3000:]
        assert "Traceback" not in log and "Task was destroyed" not in log and "never retrieved" not in log, log
    finally:
        s.stop()


def test_sigterm_after_the_core_died_still_exits_non_zero(tmp_path: Path) -> None:
    """The core dies, and SIGTERM comes within the 3 s in which /health says 503 before the server exits
    (docker stop, a Kubernetes rollout, scancel): the drain's clean stop exited 0, hiding the crash."""
    s = wait_ready(launch(tmp_path))
    try:
        core = int(re.search(r"engine core pid (\d+)", s.log())[1])
        os.kill(core, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while httpx.get(s.url("/health"), timeout=5).status_code != 503:
            assert time.monotonic() < deadline, s.log()[-3000:]
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 1, s.log()[-3000:]
    finally:
        s.stop()
