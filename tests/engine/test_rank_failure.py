"""A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-generation under torchrun/gloo: every rank and
the agent exit non-zero within 60 s, the output names the rank, and no rank process is left behind.
A stopped rank 0 is covered too: workers watch its heartbeat."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import TINY_ARCHS, write_tiny_checkpoint
from tests.engine.test_distributed import REPO, dist_env, free_port

pytestmark = pytest.mark.slow

EXIT_WITHIN_S = 60.0  # the acceptance bound, from the signal to the agent's exit
TIMEOUT_S = 10.0  # EngineConfig.distributed_timeout_s for these runs
NOTICE_SLACK_S = 8.0  # heartbeat probe (2 s) plus scheduling noise on a busy 2-core machine


class Group:
    """One torchrun agent running tests.engine.dist_long_generate; its output is timestamped per line."""

    def __init__(self, model: str, nproc: int, tp: int, pp: int, workdir: Path):
        self.workdir = workdir
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "tests.engine.dist_long_generate", model, str(tp), str(pp),
               str(TIMEOUT_S)]
        env = dict(dist_env(), GANTRY_TEST_DIR=str(workdir))
        self.nproc = nproc
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def pid(self, rank: int) -> int:
        return int((self.workdir / f"rank{rank}.pid").read_text())

    def wait_generating(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not (self.workdir / "rank0.generating").exists():
            assert self.proc.poll() is None, f"the group exited before generating:\n{self.output[-4000:]}"
            assert time.monotonic() < deadline, f"no generation after {timeout} s:\n{self.output[-4000:]}"
            time.sleep(0.2)
        for rank in range(self.nproc):
            assert (self.workdir / f"rank{rank}.pid").exists()

    def kill_everything(self) -> None:
        """Cleanup after a failed assertion, while the agent still owns its ranks (so no pid is reused)."""
        if self.proc.poll() is None:
            for rank in range(self.nproc):
                try:
                    os.kill(self.pid(rank), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            self.proc.kill()
        self.proc.wait()


def is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie holds no resources
    except FileNotFoundError:
        return True


def assert_all_exited(group: Group, signalled_at: float) -> None:
    try:
        group.proc.wait(timeout=EXIT_WITHIN_S - (time.monotonic() - signalled_at))
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun still running {EXIT_WITHIN_S} s after the signal:\n{group.output[-4000:]}")
    group._reader.join(timeout=5)
    assert group.proc.returncode != 0, group.output[-4000:]
    assert not list(group.workdir.glob("rank*.exit0")), "a rank exited normally"
    pids = [group.pid(rank) for rank in range(group.nproc)]
    deadline = time.monotonic() + 5
    while not all(is_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(is_gone(p) for p in pids), f"orphan rank processes: {[p for p in pids if not is_gone(p)]}"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    spec = dict(TINY_ARCHS["llama-untied"])
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), spec.pop("arch"), **spec)


def test_killed_rank_stops_the_group(tiny_model: str, tmp_path: Path) -> None:
    """SIGKILL the last stage's first TP rank of tp2 x pp2: the agent tears the group down and names it."""
    group = Group(tiny_model, 4, 2, 2, tmp_path)
    try:
        group.wait_generating()
        os.kill(group.pid(2), signal.SIGKILL)
        killed_at = time.monotonic()
        assert_all_exited(group, killed_at)
    except BaseException:
        group.kill_everything()
        raise
    root_cause = group.output.split("Root Cause", 1)[-1]
    assert re.search(r"rank\s*: 2 \(local_rank: 2\)\s+exitcode\s*: -9", root_cause), group.output[-4000:]


def test_hung_rank_is_named_within_the_timeout(tiny_model: str, tmp_path: Path) -> None:
    """SIGSTOP rank 1 of tp2: rank 0's all-reduce times out after distributed_timeout_s, its log line
    names rank 1 (from the heartbeats), it exits non-zero and the agent kills the stopped rank."""
    group = Group(tiny_model, 2, 2, 1, tmp_path)
    try:
        group.wait_generating()
        os.kill(group.pid(1), signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert_all_exited(group, stopped_at)
    except BaseException:
        group.kill_everything()
        raise
    named = [(t, line) for t, line in group.lines if "ERROR gantry.engine: rank 0:" in line]
    assert named, group.output[-4000:]
    noticed_at, line = named[0]
    assert "rank 1 stopped answering" in line
    assert noticed_at - stopped_at <= TIMEOUT_S + NOTICE_SLACK_S, line


def test_hung_rank_0_is_left_by_the_workers(tiny_model: str, tmp_path: Path) -> None:
    """SIGSTOP rank 0 of pp2: rank 1 (last stage) sends its tokens without blocking and then waits
    for rank 0's next batch, with no timeout; it sees rank 0's heartbeat stand still for
    distributed_timeout_s, says so and exits non-zero."""
    group = Group(tiny_model, 2, 1, 2, tmp_path)
    try:
        group.wait_generating()
        os.kill(group.pid(0), signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert_all_exited(group, stopped_at)
    except BaseException:
        group.kill_everything()
        raise
    named = [(t, line) for t, line in group.lines if "ERROR gantry.engine: rank 1:" in line]
    assert named, group.output[-4000:]
    noticed_at, line = named[0]
    assert "rank 0 stopped answering" in line
    assert noticed_at - stopped_at <= TIMEOUT_S + NOTICE_SLACK_S, line
