"""`--api-server-count N`: API processes 1..N-1, started by API process 0 once the engine core runs.

Each binds the same host:port with SO_REUSEPORT (the kernel spreads connections over them), has
its own tokenizer, text workers and output socket, and talks to the one engine core. API process 0
forwards SIGTERM to them (each drains its own requests), waits for them before stopping the core,
and stops everything if one of them dies. Per-process counters and histograms are summed at
scrape time through prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR), so any
process's /metrics counts every request once; the engine's gauges come from the core's stats.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
from typing import Any

from engine.config import EngineConfig, ServerConfig
from engine.core_proc import CoreAddresses, die_with_parent

logger = logging.getLogger("gantry.server")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess_metrics() -> str:
    """A fresh directory for prometheus_client's per-process files; call before prometheus_client
    is imported (it picks its value class at import time). Returns the directory."""
    path = tempfile.mkdtemp(prefix="gantry-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


class ReadyGroup:
    """Readiness of all API processes: each sets its own event once it can serve; /ready (and
    every API route) answers 200 only once all are set, since the shared port sends a request to
    any of them."""

    def __init__(self, events: list[Any], index: int):
        self.events, self.index = events, index

    def ready(self) -> bool:
        """Marks this process ready (it asks only when it is); True once every process is."""
        self.events[self.index].set()
        return all(e.is_set() for e in self.events)


class ApiProcesses:
    """API process 0's handle on API processes 1..N-1."""

    def __init__(self, engine_config: EngineConfig, server_config: ServerConfig, api_key: str | None,
                 addresses: CoreAddresses, log_level: str):
        self.args = (engine_config, server_config, api_key, addresses, log_level)
        self.count = server_config.api_server_count
        self.procs: list[Any] = []
        self.stopping = False
        self.ready_events = [multiprocessing.get_context("spawn").Event() for _ in range(self.count)]

    def start(self, core_pid: int) -> None:
        """From the main thread (their PR_SET_PDEATHSIG is tied to the thread that starts them)."""
        mp = multiprocessing.get_context("spawn")
        for index in range(1, self.count):
            proc = mp.Process(target=run_api_process, name=f"gantry-api-{index}",
                              args=(*self.args, index, core_pid, os.getpid(), self.ready_events))
            proc.start()
            self.procs.append(proc)
        if self.procs:
            logger.info("%d API processes share the port (pids %s)", self.count,
                        ", ".join([str(os.getpid())] + [str(p.pid) for p in self.procs]))

    def dead(self) -> list[int]:
        """Indices of API processes that exited while nobody asked them to."""
        return [i for i, p in enumerate(self.procs, 1) if not self.stopping and not p.is_alive()]

    def drain(self) -> None:
        self.stopping = True
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)

    def join(self, timeout: float) -> None:
        """Wait for them (draining); kill what is left after timeout."""
        self.stopping = True
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(5)

    def kill(self) -> None:
        self.stopping = True
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(5)


async def _until_ready(state: Any) -> None:
    """Asks until the group is ready: asking is what marks this process ready for the others."""
    while not state.ready:
        await asyncio.sleep(0.1)


def run_api_process(engine_config: EngineConfig, server_config: ServerConfig, api_key: str | None,
                    addresses: CoreAddresses, log_level: str, client_index: int, core_pid: int, parent_pid: int,
                    ready_events: list[Any]) -> None:
    """Main of API process client_index >= 1."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: API process 0 decides
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.serve import bind_socket
    from engine.server.app import create_app

    sock = bind_socket(server_config.host, server_config.port, reuse_port=True)
    app = create_app(engine_config, server_config, api_key, client_index=client_index, addresses=addresses,
                     core_pid=core_pid, log_level=log_level)
    app.ctx.state.set_group(ReadyGroup(ready_events, client_index))
    app.register_listener(lambda app: app.ctx.state.run_in_background(_until_ready(app.ctx.state)),
                          "after_server_start")
    app.run(sock=sock, single_process=True, access_log=False, motd=False)
    sys.exit(app.ctx.state.exit_code)
