"""Free TCP ports for the servers and torchrun groups the tests start, safe with several pytest
processes at once (pytest-xdist workers, or two sessions on one machine).

A port from bind(("", 0)) comes from the kernel's ephemeral range, the same pool every outgoing
connection and every gloo socket draws from: between the test closing it and torchrun or the
server binding it seconds later, another worker's group may take it. These ports come from
below the ephemeral range instead, which the kernel never hands out on its own, from a slice of
their own per xdist worker, each checked free before it is returned.
"""
from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

LOWEST_PORT = 20000  # above well-known services and the server's default port (8000)
AVOID = frozenset({29400, 29500})  # torchrun's default rendezvous and master ports: a bare torchrun takes them


def _ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_slice() -> range:
    """This xdist worker's share of the ports below the ephemeral range (all of it without xdist)."""
    low, high = LOWEST_PORT, _ephemeral_low()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    if high - low < 100 * count:  # an unusual ephemeral range leaves no room: share what there is
        return range(low, max(high, low + 100))
    size = (high - low) // count
    return range(low + index * size, low + (index + 1) * size)


def _candidates() -> Iterator[int]:
    """The slice round-robin from a random start: one process does not reuse a port soon (it may
    still be in TIME_WAIT), and two sessions on one machine rarely meet."""
    ports = _worker_slice()
    start = random.Random(os.getpid()).randrange(len(ports))
    return (ports[(start + i) % len(ports)] for i in itertools.count())


_next_candidates: Iterator[int] | None = None  # made on first use, in the process (worker) that uses it


def _is_free(port: int) -> bool:
    """Nothing listens on, is bound to, or lingers in TIME_WAIT on port (IPv4, any address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))  # no SO_REUSEADDR: a TIME_WAIT or SO_REUSEPORT socket makes this fail too
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port nothing uses now, that no other worker of this pytest run will be given."""
    global _next_candidates
    if _next_candidates is None:
        _next_candidates = _candidates()
    for _ in range(len(_worker_slice())):
        port = next(_next_candidates)
        if port not in AVOID and _is_free(port):
            return port
    raise RuntimeError("no free TCP port below the ephemeral range")
