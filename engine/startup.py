"""Start-up phase timings: the steps of loading record how long they took, and the server logs
them in one line once it is ready (`start-up 6.1 s to ready (CPU time 5.2 s): imports 2.0 s, ...`)."""
from __future__ import annotations

import ctypes
import gc
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


def release_memory() -> None:
    """Hand the heap's free pages back to the OS once loading is done: glibc keeps what Python and
    torch freed (the GGUF parse, the tokenizer's conversion, the weights' staging copies), and it
    would count in the server's RSS for good (the API process after its tokenizer: 139 -> 110 MiB)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def since_start() -> float:
    return time.monotonic() - _STARTED


def summary(total: float, core_phases: dict[str, float] | None = None) -> str:
    """`start-up 7.9 s to ready (CPU time 3.1 s): API process: imports 1.7 s, ...; engine core, in
    parallel: start 0.3 s, imports 2.3 s, ...; text workers 0.2 s`. The core's phases are its own
    (engine.serve starts it first, so they overlap the API process's); CPU time (this process's)
    well below the wall time means waiting on the core or a machine busy with other work."""
    with _lock:
        phases = dict(_phases)
    workers = phases.pop("text workers", None)
    parts = [f"{name} {seconds:.1f} s" for name, seconds in phases.items()]
    text = f"start-up {total:.1f} s to ready (CPU time {time.process_time():.1f} s): API process: " + ", ".join(parts)
    if core_phases:
        text += "; engine core, in parallel: " + ", ".join(f"{n} {s:.1f} s" for n, s in core_phases.items())
    if workers is not None:  # after the engine: the API's tokenizer processes
        text += f"; text workers {workers:.1f} s"
    return text
