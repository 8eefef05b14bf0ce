"""launcher.torchrun as Docker, Kubernetes and Slurm run it: a SIGTERM to the agent itself (docker
stop, a deleted pod) is handed to rank 0, whose shutdown ends the group with status 0 and no
traceback; a second SIGTERM is torchrun's own stop, still without one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import pythonpath_with_repo
from tests.launcher.conftest import REPO_ROOT
from tests.launcher.standin_serve import is_alive
from tests.launcher.test_local import _kill_leftovers, _wait

pytestmark = pytest.mark.slow


def _start(tmp_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    (tmp_path / "engine.yaml").write_text("engine: {}\nserver: {}\n")
    argv = [sys.executable, "-m", "launcher.torchrun", "--nnodes", "1", "--nproc-per-node", "2", "--standalone",
            "--max-restarts", "0", "-m", "tests.launcher.standin_serve", "--config", str(tmp_path / "engine.yaml")]
    with open(tmp_path / "agent.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": pythonpath_with_repo(), **(env or {})})
    ranks = tmp_path / "ranks"
    _wait(lambda: proc.poll() is None and len(list(ranks.glob("*.pid"))) == 2, 120, "both ranks to start")
    return proc, ranks


def _pids(ranks: Path) -> list[int]:
    return [int(p) for f in ranks.glob("*.pid") for p in f.read_text().split()]


def test_sigterm_to_the_agent_stops_rank_0_first(tmp_path: Path) -> None:
    proc, ranks = _start(tmp_path)
    pids = _pids(ranks)
    try:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        proc.kill()
        leftovers = _kill_leftovers(pids)
    log = (tmp_path / "agent.log").read_text()
    assert code == 0 and not leftovers, log
    assert log.strip() == "", log  # no banner, no "death signal", no traceback


def test_second_sigterm_is_torchruns_own_stop(tmp_path: Path) -> None:
    """Ranks that ignore the first signal: the second stops every rank (exit 128 + 15), quietly."""
    proc, ranks = _start(tmp_path, env={"STANDIN_STUBBORN": "1"})
    pids = _pids(ranks)
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert proc.poll() is None and all(is_alive(p) for p in pids)  # waiting for rank 0
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)  # torchrun gives stubborn workers 30 s before SIGKILL
    finally:
        proc.kill()
        _kill_leftovers(pids)
    log = (tmp_path / "agent.log").read_text()
    assert code == 128 + signal.SIGTERM, log
    assert "Traceback" not in log and "SignalException" not in log, log
