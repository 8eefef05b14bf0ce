"""Live servers for the API tests: `python -m engine.serve` on the embedded SmolLM2, in a
subprocess on a free loopback port, one per test module; helpers to read /metrics."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.ports import free_port  # noqa: F401 (the server tests import it from here)

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 128  # short, so that a request without max_tokens ends quickly on CPU too
# Small and leak-revealing: a pool of 512 pages of 16 tokens.
BASE_ARGS = ["--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "512",
             "--max-num-seqs", "64"]
START_TIMEOUT_S = 240.0


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None
    ready_statuses: list[int] = field(default_factory=list)  # /ready answers seen while starting

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """/metrics as {(sample name, sorted labels without model_name): value}."""
        r = httpx.get(self.url("/metrics"), headers=self.headers, timeout=10)
        r.raise_for_status()
        out = {}
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_idle(self, timeout: float = 30.0) -> dict[tuple[str, tuple], float]:
        """Until nothing runs, waits or holds a KV page; returns the last /metrics."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            idle = (m.get(("gantry:num_requests_running", ())) == 0 and m.get(("gantry:num_requests_waiting", ())) == 0
                    and m.get(("gantry:kv_cache_usage_perc", ())) == 0)
            if idle or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(tmp_dir: Path, *args: str, env: dict[str, str] | None = None, api_key: str | None = None,
           entry: tuple[str, ...] = ("-m", "engine.serve"), base_args: Sequence[str] = tuple(BASE_ARGS)) -> LiveServer:
    """Start a server and return at once (it loads in the background); entry: what python runs
    (e.g. ("-c", code) for a server with an engine_factory), given engine.serve's flags;
    base_args: the tests' small-server flags (() for the defaults a user gets)."""
    port = free_port()
    log_path = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, *entry, "--host", "127.0.0.1", "--port", str(port), *base_args, *args]
    # without the caller's $GANTRY_API_KEY, which the server would otherwise require (unless env passes it)
    inherited = {k: v for k, v in os.environ.items() if k != "GANTRY_API_KEY"}
    proc_env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=proc_env)
    return LiveServer(proc, port, log_path, api_key)


def wait_ready(server: LiveServer, timeout: float = START_TIMEOUT_S) -> LiveServer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log()[-4000:]}")
        try:
            status = httpx.get(server.url("/ready"), timeout=5).status_code
            server.ready_statuses.append(status)
            if status == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()[-4000:]}")


MAX_BODY_BYTES = 65536


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A ready server without an API key (the seed's examples send none), shared by the API,
    error and load tests to pay for one model load."""
    s = wait_ready(launch(tmp_path_factory.mktemp("server"), "--max-request-body-bytes", str(MAX_BODY_BYTES)))
    yield s
    s.stop()


API_KEY = "hardening-key-5d2e"  # given through an environment variable, never on the command line
KEYED_MAX_MODEL_LEN = 1024  # long enough that a large request is really tokenized before it is refused


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory):
    """A ready server with an API key and the default body limit (8 MiB), shared by the
    hardening and large-request tests to pay for one model load."""
    s = wait_ready(launch(tmp_path_factory.mktemp("keyed_server"), "--api-key-env", "GANTRY_TEST_API_KEY",
                          "--max-model-len", str(KEYED_MAX_MODEL_LEN), env={"GANTRY_TEST_API_KEY": API_KEY},
                          api_key=API_KEY))
    yield s
    s.stop()
