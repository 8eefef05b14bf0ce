"""How the suite runs on pytest-xdist workers (`-n 2 --dist loadgroup`, scripts/test.sh).

A test module goes to one worker whole (its module fixtures, e.g. a live server, start once),
unless it names an `xdist_group` of its own (tests/infra: one Slurm cluster, one Docker engine).
A test marked `exclusive` runs alone on the machine: its timing bounds or whole-machine load must
not share the two CI cores with another worker's test. Without xdist this plugin does nothing.
"""
from __future__ import annotations

import fcntl
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

_LOCK = pytest.StashKey["RunLock"]()


class RunLock:
    """A readers-writer lock shared by the workers of one pytest run, through two files: every
    test holds it shared, an exclusive test exclusively (flock: the kernel drops it if a worker
    dies). A turnstile in front keeps an exclusive test from waiting forever behind the other
    worker's back-to-back shared tests."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._turnstile = open(directory / "gantry-turnstile.lock", "a+b")  # noqa: SIM115 (held for the run)
        self._machine = open(directory / "gantry-machine.lock", "a+b")  # noqa: SIM115

    @contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self._machine, fcntl.LOCK_UN)


@pytest.hookimpl(trylast=True)  # after every conftest has marked its items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under --dist loadgroup, the scope a worker takes whole is the nodeid's "@group" suffix:
    the test's xdist_group names, else its module. xdist suffixes marked items itself when its
    hook runs after the conftest that marked them; this one (last) does the rest the same way."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        names = {str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                 for m in item.iter_markers("xdist_group")}
        scope = "_".join(sorted(names)) or item.nodeid.split("::")[0]
        if not item.nodeid.endswith(f"@{scope}"):  # else xdist's own hook did it
            item._nodeid = f"{item.nodeid}@{scope}"


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: its basetemp is <the run's basetemp>/gwN
        config.stash[_LOCK] = RunLock(Path(config.option.basetemp).parent)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: pytest-timeout's clock starts after the wait
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """Setup (module and session fixtures included), call and teardown, all under the lock."""
    lock = item.config.stash.get(_LOCK, None)
    if lock is None:
        return (yield)
    with lock.hold(exclusive=item.get_closest_marker("exclusive") is not None):
        return (yield)
