"""Start-up phase timings: the steps of loading record how long they took, and the server logs
them in one line once it is ready (`start-up 6.1 s to ready (CPU time 5.2 s): imports 2.0 s, ...`)."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_STARTED = time.monotonic()  # this module is imported first by engine.serve
_lock = threading.Lock()
_phases: dict[str, float] = {}  # name -> seconds, in the order first recorded


def record(name: str, seconds: float) -> None:
    with _lock:
        _phases[name] = _phases.get(name, 0.0) + seconds


@contextmanager
def phase(name: str) -> Iterator[None]:
    start = time.monotonic()
    try:
        yield
    finally:
        record(name, time.monotonic() - start)


def phases() -> dict[str, float]:
    """name -> seconds, in the order first recorded (the engine core sends its own to the API)."""
    with _lock:
        return dict(_phases)


def recorded() -> float:
    """Seconds recorded so far, all phases together."""
    with _lock:
        return sum(_phases.values())


def since_start() -> float:
    return time.monotonic() - _STARTED


def summary(total: float) -> str:
    """`start-up 6.1 s to ready (CPU time 5.2 s): imports 2.0 s, ..., warm-up and server 0.4 s`;
    CPU time well below the wall time means the machine was busy with other work."""
    with _lock:
        phases = dict(_phases)
    rest = max(0.0, total - sum(phases.values()))
    parts = [f"{name} {seconds:.1f} s" for name, seconds in phases.items() if name != "text workers"]
    parts.append(f"warm-up and server {rest:.1f} s")
    if "text workers" in phases:  # after the engine: the API's tokenizer processes
        parts.append(f"text workers {phases['text workers']:.1f} s")
    return f"start-up {total:.1f} s to ready (CPU time {time.process_time():.1f} s): " + ", ".join(parts)
