"""Small process and polling helpers shared by the infra fixtures and tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.ports import free_port  # noqa: F401 (the infra fixtures import it from here)


def wait_for(predicate: Callable[[], object], timeout: float, what: str,
             diagnose: Callable[[], str] | None = None, interval: float = 0.5) -> object:
    """Poll `predicate` until it returns something truthy; TimeoutError names `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{diagnose()}" if diagnose else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(grace)


def processes_mentioning(text: str) -> list[str]:
    """`pid cmdline` of every live process whose command line contains `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            status = (entry / "stat").read_text()
        except OSError:
            continue
        if status.split(") ", 1)[-1].startswith("Z"):
            continue  # a zombie is already dead: only its parent's wait() is missing
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        if text in cmdline:
            found.append(f"{entry.name} {cmdline}")
    return found
