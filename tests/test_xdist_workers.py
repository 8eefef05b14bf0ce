"""The suite's own machinery for pytest-xdist: ports no two workers share and that the kernel
does not hand out on its own, and the lock that runs `exclusive` tests alone."""
from __future__ import annotations

import fcntl
import socket
from pathlib import Path

import pytest

from tests import ports
from tests.xdist_workers import RunLock


def test_workers_get_disjoint_ports_below_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    taken = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setattr(ports, "_next_candidates", None)
        taken[worker] = {ports.free_port() for _ in range(20)}
        assert len(taken[worker]) == 20  # one process does not hand a port out twice
        assert all(p in ports._worker_slice() for p in taken[worker])
    assert not taken["gw0"] & taken["gw1"]
    assert max(taken["gw0"] | taken["gw1"]) < ports._ephemeral_low()


def test_port_in_use_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_next_candidates", None)
    first, second = ports.free_port(), ports.free_port()  # two free ports (first + 1 may be a server's)
    monkeypatch.setattr(ports, "_next_candidates", iter([first, second]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", first))
        s.listen()
        assert ports.free_port() == second


def _can_flock(path: Path, mode: int) -> bool:
    """Whether another holder (its own open file) could take the lock now."""
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_exclusive_test_holds_the_machine_alone(tmp_path: Path) -> None:
    lock, machine = RunLock(tmp_path), tmp_path / "gantry-machine.lock"
    with lock.hold(exclusive=False):  # another shared test may run beside it, no exclusive one
        assert _can_flock(machine, fcntl.LOCK_SH) and not _can_flock(machine, fcntl.LOCK_EX)
    with lock.hold(exclusive=True):
        assert not _can_flock(machine, fcntl.LOCK_SH)
    assert _can_flock(machine, fcntl.LOCK_EX)  # released after the test
