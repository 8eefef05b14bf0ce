"""Multi-GPU without torchrun: rank 0 (this process) spawns ranks 1..N-1 itself, one per GPU.

ensure_group(config) hosts the group's TCP store here (a free port, no race), starts each worker
with multiprocessing's spawn context into engine.distributed.run_worker, and sets this process's
RANK/WORLD_SIZE/... so init_distributed joins the group as rank 0, exactly as under torchrun.
Workers die with this process (PR_SET_PDEATHSIG, plus a getppid watch); a dead one is named.
"""
from __future__ import annotations

import atexit
import ctypes
import logging
import multiprocessing
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from engine.config import ConfigError, EngineConfig
from engine.errors import RankFailedError

logger = logging.getLogger("gantry.engine")

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_USE_AGENT_STORE", "GLOO_SOCKET_IFNAME")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_WATCH_S = 0.5  # how often a worker checks that rank 0 is still its parent
JOIN_TIMEOUT_S = 30.0  # after rank 0 released the workers: how long they may take to exit


def ensure_group(config: EngineConfig) -> WorkerGroup | None:
    """Spawn the other ranks of a tp x pp group unless a launcher did (WORLD_SIZE is set), and make
    this process rank 0. None when there is nothing to spawn: one rank, a launcher's group, or a group
    this process spawned earlier and still runs (its WORLD_SIZE is set; it belongs to its spawner)."""
    world_size = config.world_size
    if world_size == 1 or "WORLD_SIZE" in os.environ:
        return None
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError("a spawned process is creating an engine while it imports the main module: in a "
                           "script, create LLM(tensor_parallel_size>1) under `if __name__ == '__main__':`")
    check_devices(config)
    group = WorkerGroup(config)
    group.start()
    return group


@contextmanager
def failures_named(group: WorkerGroup | None) -> Iterator[None]:
    """Around rank 0's start-up: on an error, shut the spawned ranks down and raise a RankFailedError
    naming a worker that died first (its exit and last log line), else the error itself."""
    try:
        yield
    except BaseException as e:
        if group is None:
            raise
        error = group.fail(e)
        if error is e:
            raise
        raise error from e


def check_devices(config: EngineConfig) -> None:
    """Enough GPUs for one rank each (CPU: any number of gloo ranks); a ConfigError naming the size."""
    import torch

    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return  # gloo: any number of CPU ranks
    have = torch.cuda.device_count()
    if have < config.world_size:
        param = "pipeline_parallel_size" if config.tensor_parallel_size == 1 else "tensor_parallel_size"
        raise ConfigError(param, f"tensor_parallel_size {config.tensor_parallel_size} x pipeline_parallel_size "
                          f"{config.pipeline_parallel_size} needs {config.world_size} GPUs (one per rank), but "
                          f"{have} {'is' if have == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")


class WorkerGroup:
    """Ranks 1..N-1 as child processes of rank 0. shutdown() releases them through `release`
    (the executor's shutdown message, set by the engine once it exists) and joins them, bounded."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.world_size = config.world_size
        self.procs: dict[int, BaseProcess] = {}
        self.conns: dict[int, Connection] = {}  # worker -> rank 0: ("started",), ("failed", error, last log line)
        self.reports: dict[int, tuple[str, str]] = {}  # rank -> (error, last log line) a worker sent before dying
        self.release: Callable[[], None] | None = None
        self._saved_env: dict[str, str | None] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the monitor thread and rank 0's main thread read the pipes
        self._monitor_thread: threading.Thread | None = None
        self._closed = False
        self.store = None

    def start(self) -> None:
        import torch.distributed as dist

        timeout = timedelta(seconds=self.config.distributed_timeout_s)
        # hosted here, as torchrun's agent hosts it: port 0 picks a free port with no race
        self.store = dist.TCPStore("127.0.0.1", 0, self.world_size, is_master=True, timeout=timeout,
                                   wait_for_workers=False)
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.store.port), "WORLD_SIZE": str(self.world_size),
               "LOCAL_WORLD_SIZE": str(self.world_size), "TORCHELASTIC_USE_AGENT_STORE": "True",
               # one host: gloo's pairs over loopback, whatever the host name resolves to
               "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
        # PR_SET_PDEATHSIG fires when the spawning *thread* ends: only trust it from the main thread
        pdeathsig = threading.current_thread() is threading.main_thread()
        level = logging.getLogger("gantry").getEffectiveLevel()
        ctx = multiprocessing.get_context("spawn")
        try:
            for rank in range(1, self.world_size):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker_main, name=f"gantry-rank{rank}", daemon=False,
                                   args=(self.config, {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                         os.getpid(), pdeathsig, level, writer))
                proc.start()
                writer.close()
                self.procs[rank], self.conns[rank] = proc, reader
            atexit.register(self.shutdown)  # after multiprocessing's own exit hook, so it runs first
            self._wait_started()
        except BaseException:
            self.shutdown()
            raise
        for key in ENV_KEYS:
            self._saved_env[key] = os.environ.get(key)
        os.environ.update({**env, "RANK": "0", "LOCAL_RANK": "0"})
        self._monitor_thread = threading.Thread(target=self._monitor, name="gantry-worker-monitor", daemon=True)
        self._monitor_thread.start()
        logger.info("spawned ranks 1..%d (pids %s), store on 127.0.0.1:%d", self.world_size - 1,
                    ", ".join(str(p.pid) for p in self.procs.values()), self.store.port)

    def attach(self, owner: object, release: Callable[[], None]) -> None:
        """Once the engine is up: release() tells the workers to stop (the executor's shutdown);
        the group shuts down with owner (when it is collected) or at interpreter exit."""
        self.release = release
        weakref.finalize(owner, self.shutdown)

    def _wait_started(self) -> None:
        """Until every worker runs its target: one that dies in its bootstrap (the main module
        re-imported without a __main__ guard, say) is named now, not after the store's timeout."""
        waiting = set(self.procs)
        deadline = time.monotonic() + max(60.0, self.config.distributed_timeout_s)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailedError(f"rank{'s' if len(waiting) > 1 else ''} {', '.join(map(str, sorted(waiting)))} "
                                      f"did not start within {max(60.0, self.config.distributed_timeout_s):.0f} s")
            ready = wait([self.conns[r] for r in waiting] + [self.procs[r].sentinel for r in waiting], timeout=left)
            for rank in sorted(waiting):
                if self.conns[rank] in ready and self._read(rank) == "started":
                    waiting.discard(rank)
                elif self.procs[rank].sentinel in ready:
                    raise RankFailedError(self.describe(rank, "before it started") + " (its traceback is above; "
                                          "a script must create the LLM under `if __name__ == '__main__':`)")

    def _read(self, rank: int) -> str | None:
        """One message from this worker, if one is waiting (the monitor thread reads too)."""
        with self._lock:
            try:
                if self.conns[rank].closed or not self.conns[rank].poll():
                    return None
                message = self.conns[rank].recv()
            except (EOFError, OSError):
                return None
        if message[0] == "failed":
            self.reports[rank] = (message[1], message[2])
        return message[0]

    def _monitor(self) -> None:
        """Say at once which worker died and how; rank 0's own error follows from the executor."""
        alive = dict(self.procs)
        while alive and not self._stopping.is_set():
            ready = wait([p.sentinel for p in alive.values()] + [self.conns[r] for r in alive], timeout=1.0)
            for rank in list(alive):
                if self.conns[rank] in ready:
                    self._read(rank)
                if alive[rank].sentinel in ready:
                    del alive[rank]
                    if not self._stopping.is_set():
                        logger.error("%s", self.describe(rank, "while rank 0 still needed it"))

    def exited_ranks(self) -> list[int]:
        return [rank for rank, proc in self.procs.items() if proc.exitcode is not None]

    def describe(self, rank: int, when: str) -> str:
        """'rank 1 (pid 123) was killed by SIGKILL <when>: <error>; last log line: ...'"""
        proc = self.procs[rank]
        proc.join(timeout=1.0)  # its sentinel fired: the exit status is a moment away
        code = proc.exitcode
        if code is None:
            how = "stopped answering"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        text = f"rank {rank} (pid {proc.pid}) {how} {when}"
        while self._read(rank) is not None:  # a report sent just before it died
            pass
        if rank in self.reports:
            error, last_line = self.reports[rank]
            text += f": {error}" + (f"; its last log line: {last_line}" if last_line and last_line not in error else "")
        return text

    def fail(self, error: BaseException) -> BaseException:
        """Rank 0 failed while starting: shut the group down and return what to raise, a
        RankFailedError naming a worker that died (its exit and last log line), else error itself."""
        deadline = time.monotonic() + 2.0  # a worker's death and rank 0's error race: let it land
        while not self.exited_ranks() and time.monotonic() < deadline and isinstance(error, RuntimeError):
            time.sleep(0.1)
        dead = self.exited_ranks()
        self.shutdown()
        if not dead:
            return error
        return RankFailedError("; ".join(self.describe(rank, "while the engine started") for rank in dead))

    def shutdown(self) -> None:
        """Release the workers (when all are alive), join them within JOIN_TIMEOUT_S, then kill any
        left; restore this process's environment. Idempotent; also runs at interpreter exit."""
        if self._closed:
            return
        self._closed = True
        release, self.release = self.release, None
        released = False
        if release is not None and not self.exited_ranks():
            try:
                release()
                released = True
            except Exception:  # a peer died during shutdown: joining below still ends every worker
                logger.exception("releasing the spawned ranks failed; stopping them")
        self._stopping.set()
        deadline = time.monotonic() + (JOIN_TIMEOUT_S if released else 0.0)
        for proc in self.procs.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = [p for p in self.procs.values() if p.exitcode is None]
            for proc in left:
                if released and sig == signal.SIGTERM:
                    logger.warning("rank %s (pid %d) did not exit within %.0f s of the shutdown; stopping it",
                                   proc.name.removeprefix("gantry-rank"), proc.pid, JOIN_TIMEOUT_S)
                os.kill(proc.pid, sig)
            for proc in left:
                proc.join(timeout=5.0)
        for rank, proc in self.procs.items():
            if released and proc.exitcode != 0:
                logger.warning("%s", self.describe(rank, "at shutdown"))
        if self._monitor_thread is not None:
            self._monitor_thread.join(timeout=2.0)
        with self._lock:
            for conn in self.conns.values():
                conn.close()
        self._teardown_rank0()
        atexit.unregister(self.shutdown)

    def _teardown_rank0(self) -> None:
        """This process leaves the group (if the executor did not) and forgets its rank."""
        from engine.distributed import stop_heartbeats
        from engine.parallel import ParallelState, destroy_distributed, set_parallel_state

        if not self._saved_env:  # never became rank 0: any process group here is not ours
            return
        stop_heartbeats()
        destroy_distributed()
        set_parallel_state(ParallelState())
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.store = None  # the store server stops with its last reference


class _LastLine(logging.Handler):
    """Remembers the worker's last log line, for rank 0's error if the worker fails."""

    def __init__(self) -> None:
        super().__init__()
        self.line = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.line = record.getMessage().splitlines()[0] if record.getMessage() else ""


def _die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    """No orphan may keep a GPU: SIGKILL when rank 0 (or, with pdeathsig, its spawning thread) ends."""
    if pdeathsig:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); relying on the parent watch", ctypes.get_errno())
    if os.getppid() != parent_pid:  # rank 0 died before the prctl above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, name="gantry-parent-watch", daemon=True).start()


def _worker_main(config: EngineConfig, env: dict[str, str], parent_pid: int, pdeathsig: bool, log_level: int,
                 conn: Connection) -> None:
    """A spawned rank: tie its life to rank 0, take its rank from env, run the torchrun worker loop."""
    _die_with_parent(parent_pid, pdeathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides
    os.environ.update(env)
    last = _LastLine()
    gantry = logging.getLogger("gantry")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    gantry.addHandler(handler)
    gantry.addHandler(last)
    gantry.setLevel(log_level)
    conn.send(("started",))
    from engine.distributed import run_worker

    try:
        run_worker(config)
    except BaseException as e:
        last_line = last.line
        gantry.exception("rank %s failed", env["RANK"])
        conn.send(("failed", f"{type(e).__name__}: {e}", last_line))
        conn.close()
        os._exit(1)  # not SystemExit: multiprocessing would print the traceback a second time
    conn.close()
