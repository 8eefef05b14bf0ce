"""The engine core in its own process (issue 11): its death or a hang turns /health to 503 within
2 s (hang: engine_hang_timeout_s + 2 s) and the server exits non-zero; the API process's death
takes the core with it; 64 streams with a third hung up leave no KV block in use; a tp2 torchrun
group stopped by SIGTERM with 16 streams in flight ends every stream, and every rank exits 0."""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import pythonpath_with_repo, write_tiny_checkpoint
from tests.server.conftest import MODEL, REPO, LiveServer, free_port, launch, wait_ready

HANG_TIMEOUT_S = 4.0


def core_pid(server: LiveServer) -> int:
    match = re.search(r"engine core pid (\d+)", server.log())
    assert match, server.log()[-3000:]
    return int(match.group(1))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def first_503(server: LiveServer, timeout: float) -> float | None:
    """Seconds until /health answers 503 (None: not within timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if httpx.get(server.url("/health"), timeout=1).status_code == 503:
                return time.monotonic() - start
        except httpx.TransportError:
            return None  # gone without a 503
        time.sleep(0.05)
    return None


@pytest.fixture
def fresh(tmp_path: Path):
    s = wait_ready(launch(tmp_path, "--engine-hang-timeout-s", str(HANG_TIMEOUT_S)))
    yield s
    s.stop()
    s.proc.kill()


def test_sigkill_of_the_core_is_503_within_2s_then_exit_non_zero(fresh: LiveServer) -> None:
    pid = core_pid(fresh)
    os.kill(pid, signal.SIGKILL)
    waited = first_503(fresh, 5)
    assert waited is not None and waited <= 2.0, (waited, fresh.log()[-3000:])
    code = fresh.proc.wait(timeout=10)
    assert code != 0, fresh.log()[-3000:]


def test_sigstop_of_the_core_is_503_within_the_hang_timeout(fresh: LiveServer) -> None:
    pid = core_pid(fresh)
    r = httpx.post(fresh.url("/v1/completions"), json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    os.kill(pid, signal.SIGSTOP)
    try:
        waited = first_503(fresh, HANG_TIMEOUT_S + 6)
        assert waited is not None and waited <= HANG_TIMEOUT_S + 2, (waited, fresh.log()[-3000:])
        code = fresh.proc.wait(timeout=15)
        assert code != 0
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:  # the server kills what it cannot stop
            time.sleep(0.1)
        assert not alive(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigkill_of_the_api_process_takes_the_core_down(fresh: LiveServer) -> None:
    pid = core_pid(fresh)
    fresh.proc.kill()
    fresh.proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid), "the engine core outlived its API process"


def _stream(server: LiveServer, i: int, hang_up: bool) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i + 5}"}], "max_tokens": 48,
            "stream": True, "ignore_eos": True, "temperature": 0.8, "seed": i}
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=300) as r:
        assert r.status_code == 200
        for n, _line in enumerate(r.iter_lines()):
            if hang_up and n >= 6:
                return "hung up"
    return "done"


def test_64_streams_with_a_third_hanging_up_leave_no_block_in_use(server: LiveServer) -> None:
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: _stream(server, i, i % 3 == 0), range(64)))
    assert results.count("hung up") == 22 and results.count("done") == 42
    m = server.wait_idle(timeout=60)
    assert m[("gantry:kv_cache_usage_perc", ())] == 0
    assert m[("gantry:num_requests_running", ())] == 0


# ---- a tp2 torchrun group, stopped with streams in flight ----


def test_sigterm_to_a_tp2_group_with_16_streams(tmp_path: Path) -> None:
    model = write_tiny_checkpoint(str(tmp_path / "tiny"), "LlamaForCausalLM", tie=False)
    port = free_port()
    cmd = [sys.executable, "-m", "launcher.torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "2",
           "-m", "engine.serve", "--model", model, "--tensor-parallel-size", "2", "--device", "cpu",
           "--host", "127.0.0.1", "--port", str(port), "--shutdown-grace-s", "3", "--max-model-len", "512"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=pythonpath_with_repo())
    env.pop("RANK", None)
    log_path = tmp_path / "group.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LiveServer(proc, port, log_path)
    try:
        wait_ready(server, timeout=300)
        model_id = httpx.get(server.url("/v1/models")).json()["data"][0]["id"]
        started = concurrent.futures.ThreadPoolExecutor(16)

        def stream(i: int) -> list[str | None]:
            body = {"model": model_id, "prompt": [1 + i, 2, 3], "max_tokens": 400, "stream": True,
                    "ignore_eos": True}
            reasons = []
            with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        reasons += [c.get("finish_reason") for c in chunk.get("choices", [])]
            return reasons

        futures = [started.submit(stream, i) for i in range(16)]
        time.sleep(3)  # streams flowing
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        ends = [f.result(timeout=30) for f in futures]
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_text(errors="replace")
    assert code == 0, log[-4000:]
    assert all(reasons and reasons[-1] in ("length", "abort") for reasons in ends), ends
    assert "Traceback" not in log and "Error" not in log, log[-4000:]
    assert "drained; stopping" in log and "shut down by rank 0" in log, log[-4000:]


def test_tp2_server_without_torchrun(tmp_path: Path) -> None:
    """`python -m engine.serve --tensor-parallel-size 2` with no launcher: the engine core spawns rank 1
    (issue 19), answers like one process, and SIGTERM ends both ranks with exit 0, no traceback."""
    model = write_tiny_checkpoint(str(tmp_path / "tiny"), "LlamaForCausalLM", tie=False)
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    server = launch(tmp_path, "--model", model, "--tensor-parallel-size", "2", "--max-model-len", "512", env=env)
    try:
        wait_ready(server, timeout=300)
        model_id = httpx.get(server.url("/v1/models")).json()["data"][0]["id"]
        body = {"model": model_id, "prompt": [5, 6, 7], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        r = httpx.post(server.url("/v1/completions"), json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()
    log = server.log()
    assert "spawned ranks 1..1" in log and "shut down by rank 0" in log, log[-4000:]
    assert "Traceback" not in log, log[-4000:]
