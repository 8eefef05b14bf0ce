"""deploy=local runs torchrun in the foreground; Ctrl-C or SIGTERM leaves no process behind.

The ranks are a stand-in module (the engine is tested on its own): what is under test is
the launcher's process handling, with a real torchrun and real signals.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import pythonpath_with_repo
from tests.launcher.conftest import REPO_ROOT
from tests.launcher.standin_serve import is_alive
from tests.ports import free_port

pytestmark = pytest.mark.slow
STANDIN = "tests.launcher.standin_serve"


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _start(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """The launcher, its output in tmp_path/launcher.log (a pipe would be held open by leftover ranks)."""
    out = tmp_path / "jobs"
    argv = [sys.executable, "-m", "launcher", f"deploy.module={STANDIN}", "parallel=pp2", "engine=cpu",
            "server=noauth", f"output_dir={out}", *extra]
    with open(tmp_path / "launcher.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": pythonpath_with_repo(), **(env or {})})
    return proc, out


def _kill_leftovers(pids: list[int]) -> list[int]:
    """SIGKILL whichever recorded pids are still alive (so a failing test cleans up); return them."""
    alive = [p for p in pids if is_alive(p)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


def _pids(out: Path, proc: subprocess.Popen) -> list[int]:
    """Pids the two ranks (and their children) recorded, once both have started."""
    def started() -> bool:
        assert proc.poll() is None, f"launcher exited {proc.returncode}:\n{(out.parent / 'launcher.log').read_text()}"
        return len(list(out.rglob("ranks/*.pid"))) == 2

    _wait(started, 120, "both ranks to start")
    return [int(p) for f in out.rglob("ranks/*.pid") for p in f.read_text().split()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_signal_stops_every_rank(signum: int, tmp_path: Path) -> None:
    """Rank 0 gets the signal and the others follow it (the engine's shutdown): torchrun ends with
    status 0 and the console shows one line about the stop, no traceback of the agent."""
    proc, out = _start(tmp_path)
    pids: list[int] = []
    try:
        pids = _pids(out, proc)
        assert len(pids) == 2 and all(is_alive(p) for p in pids)
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
        leftovers = _kill_leftovers(pids)
    log = (tmp_path / "launcher.log").read_text()
    assert "stopping the torchrun group" in log, log
    assert not leftovers, log
    assert code == 0, log
    for noise in ("Traceback", "SignalException", "death signal", "closing signal", "OMP_NUM_THREADS"):
        assert noise not in log, log


def test_rank_config_error_is_its_own_line(tmp_path: Path) -> None:
    """A rank failing on its config: its line, then one line naming the rank; not ChildFailedError's report."""
    proc, _out = _start(tmp_path, env={"STANDIN_CONFIG_ERROR": "1"})
    try:
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    log = (tmp_path / "launcher.log").read_text()
    lines = log.splitlines()
    assert code == 2, log
    assert lines[-2:] == ["engine.serve: config error: engine.standin: refused by the stand-in",
                          "gantry: rank 0 exited with code 2 (its error is above)"], log
    for noise in ("Traceback", "ChildFailedError", "error_file", "====="):
        assert noise not in log, log


def test_stubborn_ranks_and_orphans_are_killed(tmp_path: Path) -> None:
    """Ranks that ignore SIGTERM, and a grandchild in its own session: SIGKILL after stop_timeout_s."""
    proc, out = _start(tmp_path, "deploy.stop_timeout_s=3", env={"STANDIN_STUBBORN": "1"})
    pids: list[int] = []
    try:
        pids = _pids(out, proc)
        assert len(pids) == 3 and all(is_alive(p) for p in pids)  # two ranks and rank 0's grandchild
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
        elapsed = time.monotonic() - started
    finally:
        proc.kill()
        leftovers = _kill_leftovers(pids)
    log = (tmp_path / "launcher.log").read_text()
    assert not leftovers, log
    assert elapsed >= 3, f"stopped after {elapsed:.1f} s, before stop_timeout_s: {log}"
    assert "SIGKILL" in log and "leftover" in log, log


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read() and is_alive(int(entry)):
                    pids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError, ValueError):
            continue
    return pids


def _serve_ask_stop(tmp_path: Path, args: list[str], env: dict[str, str], key: str | None,
                    signum: int) -> tuple[int, str]:
    """`python -m launcher ARGS` with the real engine; one chat completion; then signum. (status, log)"""
    port = free_port()
    out = tmp_path / "jobs"
    argv = [sys.executable, "-m", "launcher", *args, f"server.port={port}", f"output_dir={out}"]
    with open(tmp_path / "launcher.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**env, "PYTHONPATH": pythonpath_with_repo()})
    base = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=5) as r:
                    return r.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        _wait(ready, 300, "GET /ready")
        body = json.dumps({"model": "SmolLM2-135M-Instruct", "max_tokens": 8, "temperature": 0,
                           "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=120) as r:
            reply = json.load(r)
        assert reply["choices"][0]["message"]["content"].strip(), reply
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    log = (tmp_path / "launcher.log").read_text()
    _wait(lambda: not _processes_mentioning(str(out)), 30, "the ranks to exit")
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open\n{log}"
    return code, log


def test_local_serves_the_embedded_model_and_sigterm_stops_it(tmp_path: Path) -> None:
    """The acceptance run: deploy=local parallel=tp1 with the real engine on CPU, one chat completion."""
    code, log = _serve_ask_stop(tmp_path, ["parallel=tp1", "engine=cpu", "server.host=127.0.0.1"],
                                {**os.environ, "GANTRY_API_KEY": "sk-local"}, "sk-local", signal.SIGTERM)
    assert code == 0, log
    assert "Traceback" not in log, log


def test_readme_command_without_a_key_and_ctrl_c(tmp_path: Path) -> None:
    """`python -m launcher engine=cpu` as the README writes it, GANTRY_API_KEY unset: served without a key
    on loopback (a warning says so); Ctrl-C stops it with status 0 and no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "GANTRY_API_KEY"}
    code, log = _serve_ask_stop(tmp_path, ["engine=cpu"], env, None, signal.SIGINT)
    assert "GANTRY_API_KEY is not set: no API key, so the API listens on 127.0.0.1 only" in log, log
    assert code in (0, 130), log
    assert "Traceback" not in log, log
