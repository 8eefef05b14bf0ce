"""The engine core in a process of its own, driven over ZMQ by the API processes.

    API process i --PUSH--> [input PULL]  engine core  [PUSH per client] --> PULL of API process i

The core process binds one input socket; every API process connects to it and sends add / abort /
EOS / shutdown messages (first frame: the kind, second: msgpack). Each API process binds its own
output socket; the core sends it, after every step that produced something for its requests, ONE
message with all of them (EngineCoreOutputs), and every client a stats heartbeat at least every
HEARTBEAT_INTERVAL_S, which is how the API processes tell a hung core from an idle one.

The core ignores SIGINT and SIGTERM (its parent, API process 0, decides when to stop: it sends
SHUTDOWN after draining) and dies with its parent (PR_SET_PDEATHSIG), so no orphan holds the GPU.
On a torchrun group the core is rank 0 of the process group (it inherits API process 0's RANK=0
environment); the other ranks run engine.distributed.run_worker as before.
"""
from __future__ import annotations

import ctypes
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq

from engine import startup
from engine.config import ConfigError, EngineConfig
from engine.core_messages import (CoreInfo, EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, SchedulerStats,
                                  encoder)
from engine.errors import ModelLoadError
from engine.sampling_params import SamplingParams

logger = logging.getLogger("gantry.engine")

HEARTBEAT_INTERVAL_S = 0.5
# first frame of a message to the core
ADD, ABORT, EOS, SHUTDOWN = b"a", b"x", b"e", b"s"
# first frame of a message from the core
OUTPUTS, READY, FAILED, DEAD = b"o", b"r", b"f", b"d"

CoreFactory = Callable[[EngineConfig], Any]  # EngineConfig -> CoreBuild (engine.core_build)
# SchedulerStats' cumulative counters (the rest are gauges)
COUNTERS = ("num_preemptions_total", "prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total",
            "generation_tokens_total")


@dataclass(frozen=True)
class CoreAddresses:
    input: str  # the core's PULL socket
    outputs: tuple[str, ...]  # one PULL socket per API process, by client index

    @staticmethod
    def new(num_clients: int) -> tuple[CoreAddresses, str]:
        """ipc:// addresses in a fresh private directory (returned: the caller removes it)."""
        base = tempfile.mkdtemp(prefix="gantry-")
        return CoreAddresses(f"ipc://{base}/in", tuple(f"ipc://{base}/out{i}" for i in range(num_clients))), base


class CoreLoadFailure(msgspec.Struct, array_like=True):
    exit_code: int  # 2: the config or the model's files are at fault; 1: anything else
    message: str


# ---- the parent's side ----------------------------------------------------------------------


class EngineCoreProcess:
    """API process 0's handle on the engine-core child, a fresh interpreter (safe with CUDA and with threads).
    Started with subprocess, not multiprocessing's spawn: spawn also starts a resource-tracker process
    (15 MiB) that the core never uses. Start it from the main thread: the child's PR_SET_PDEATHSIG fires
    when the thread that started it ends."""

    def __init__(self, config: EngineConfig, addresses: CoreAddresses, log_level: str,
                 core_factory: CoreFactory | None = None):
        self.args = (config, addresses, os.getpid(), log_level, core_factory)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # the child takes this interpreter's sys.path first (a core_factory may live anywhere on it), then
        # run_engine_core's arguments; interpreter flags (-X importtime, -O...) carry over as with spawn
        cmd = [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", _CHILD_MAIN]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        try:
            with self.proc.stdin as f:
                f.write(pickle.dumps(sys.path) + pickle.dumps((*self.args, time.time())))
        except BrokenPipeError:  # it died at once: its exit code says so to whoever watches it
            pass

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exitcode(self) -> int | None:
        """As multiprocessing's: None while running, -N after signal N."""
        return self.proc.poll() if self.proc is not None else None

    def kill(self) -> None:
        """At once: a start that a check in the API process refused, a core still loading, or a hung one."""
        if self.is_alive():
            self.proc.kill()
            self.proc.wait(5)

    def stop(self, timeout: float) -> None:
        """Wait up to timeout for it to exit (after SHUTDOWN), then kill it (a hung or stopped core)."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("the engine core did not exit within %.0fs; killing it", timeout)
            self.kill()


# the child's -c program (see EngineCoreProcess.start)
_CHILD_MAIN = ("import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); "
               "from engine.core_proc import run_engine_core; run_engine_core(*pickle.load(sys.stdin.buffer))")


def pid_alive(pid: int) -> bool:
    """Whether pid runs (a zombie counts as dead): how API processes other than the core's parent
    tell that it died."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and poll getppid() as a backup."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# ---- the core's side ------------------------------------------------------------------------


def run_engine_core(config: EngineConfig, addresses: CoreAddresses, parent_pid: int, log_level: str,
                    core_factory: CoreFactory | None, spawned_at: float) -> None:
    """The child's main: build the core, warm it up, tell the clients, then serve them until SHUTDOWN."""
    startup.record("start", time.time() - spawned_at)  # a fresh interpreter (spawn)
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx = zmq.Context()
    inputs = ctx.socket(zmq.PULL)
    inputs.bind(addresses.input)
    outputs = []
    for address in addresses.outputs:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        outputs.append(sock)
    core, group = _load(config, core_factory, outputs)
    try:
        # with ranks of our own (no torchrun), stopping releases them and waits for them to exit
        code = EngineCoreLoop(core, inputs, outputs, group.shutdown if group is not None else core.shutdown,
                              baseline=core.get_stats()).run()
    except Exception as e:  # a failure no single request explains: the API processes see us gone
        logger.exception("engine core died")
        for sock in outputs:
            sock.send_multipart((DEAD, encoder.encode(f"{type(e).__name__}: {e}")))
        code = 1
    ctx.destroy(linger=0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: torch's and the process group's atexit work is not needed


def _load(config: EngineConfig, core_factory: CoreFactory | None, outputs: list) -> tuple[Any, Any]:
    """Spawn the other ranks if no launcher did, build and warm up the core; on failure tell every
    client why (a rank that died named with its last log line) and exit."""
    with startup.phase("imports"):
        from engine.core_build import build_engine_core
        from engine.spawn import ensure_group, failures_named

    group = None
    try:
        group = ensure_group(config)  # tp x pp > 1 without torchrun: ranks 1.. are our children
        with failures_named(group):
            build = (core_factory or build_engine_core)(config)
        core = build.core
        if group is not None:
            group.attach(core, core.shutdown)
        # Warm-up: one short request through every code path, so /ready means "fast".
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        with startup.phase("warm-up"):
            core.add_request(EngineCoreRequest(request_id="warmup", prompt_token_ids=[1, 2, 3, 4],
                                               sampling_params=params, max_tokens=2, arrival_time=time.time()))
            while core.has_work():
                core.step_fn()
    except (ConfigError, ModelLoadError, ValueError, OSError) as e:
        failure = CoreLoadFailure(2, str(e) if isinstance(e, (ConfigError, ModelLoadError)) else f"{type(e).__name__}: {e}")
        _fail(outputs, failure)
    except Exception as e:
        logger.exception("cannot load the model")
        _fail(outputs, CoreLoadFailure(1, f"{type(e).__name__}: {e}"))
    from engine.gguf_file import forget_parses

    forget_parses()  # the weights are loaded (a first grammar's tokenizer parses the file again)
    startup.release_memory()  # loading's garbage (staging copies, parse) out of the RSS before serving
    info: CoreInfo = build.info
    info.startup_phases = startup.phases()
    for sock in outputs:
        sock.send_multipart((READY, encoder.encode(info)))
    return core, group


FAILED_DELIVERY_S = 30  # how long a failed core waits for an API process to take its reason


def _fail(outputs: list, failure: CoreLoadFailure) -> None:
    for sock in outputs:
        sock.send_multipart((FAILED, encoder.encode(failure)))
    # Wait until they are delivered: engine.serve starts us before API process 0 binds its socket, and
    # a quick failure (a config check) came before the bind, so a fixed short wait lost the reason.
    # Bounded: API process 0 kills us once it has the message; other API processes never start.
    outputs[0].context.destroy(linger=FAILED_DELIVERY_S * 1000)
    os._exit(failure.exit_code)


class EngineCoreLoop:
    """The busy loop: take every waiting message, run one step while there is work, send what it
    produced to the clients whose requests it concerns; block on the input socket when idle."""

    def __init__(self, core: Any, inputs: Any, outputs: list, stop: Callable[[], None],
                 baseline: SchedulerStats | None = None):
        self.core, self.inputs, self.outputs, self.stop = core, inputs, outputs, stop
        self.baseline = baseline  # the counters after the warm-up, which no client sent: /metrics counts from here
        self.client_of: dict[str, int] = {}  # request id -> the API process that sent it
        self.request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.abort_decoder = msgspec.msgpack.Decoder(list[str | tuple[str, int]])
        self.ids_decoder = msgspec.msgpack.Decoder(list[int])
        self.stopping = False

    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.inputs, zmq.POLLIN)
        core = self.core
        last_heartbeat = 0.0
        while True:
            timeout_ms = 0 if core.has_work() else int(HEARTBEAT_INTERVAL_S * 1000)
            if poller.poll(timeout_ms):
                self._take_messages()
            if self.stopping:
                self.stop()  # collects batches in flight, releases the other ranks
                return 0
            went_idle = False
            if core.has_work():
                self._send(core.step_fn())
                went_idle = not core.has_work()
            now = time.monotonic()
            # also once the last request is out: every API process's copy of the stats (its /metrics) then
            # counts it, not only the one that served it (--api-server-count N)
            if went_idle or now - last_heartbeat >= HEARTBEAT_INTERVAL_S:
                beat = encoder.encode(EngineCoreOutputs(timestamp=time.time(), stats=self._stats(core.get_stats())))
                for sock in self.outputs:
                    sock.send_multipart((OUTPUTS, beat))
                last_heartbeat = now

    def _take_messages(self) -> None:
        while True:
            try:
                kind, payload = self.inputs.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if kind == ADD:
                self._add(self.request_decoder.decode(payload))
            elif kind == ABORT:
                ids = self.abort_decoder.decode(payload)
                self.core.abort_requests(ids)
                for item in ids:
                    if isinstance(item, str) or item[1] < 0:
                        self.client_of.pop(item if isinstance(item, str) else item[0], None)
            elif kind == EOS:
                self.core.add_eos_token_ids(self.ids_decoder.decode(payload))
            elif kind == SHUTDOWN:
                self.stopping = True

    def _add(self, request: EngineCoreRequest) -> None:
        try:
            self.core.add_request(request)
        except Exception as e:  # refused alone (the client validated it; a duplicate id, say)
            logger.warning("request %s refused by the engine core: %s", request.request_id, e)
            error = EngineCoreOutputs(outputs=[
                EngineCoreOutput(request_id=request.request_id, index=i, finish_reason="abort", error=(None, str(e)))
                for i in range(request.sampling_params.n)], timestamp=time.time())
            self.outputs[request.client_index].send_multipart((OUTPUTS, encoder.encode(error)))
            return
        self.client_of[request.request_id] = request.client_index

    def _stats(self, stats: SchedulerStats) -> SchedulerStats:
        if self.baseline is None:
            return stats
        return msgspec.structs.replace(stats, **{name: getattr(stats, name) - getattr(self.baseline, name)
                                                 for name in COUNTERS})

    def _send(self, step: EngineCoreOutputs) -> None:
        if not step.outputs:
            return
        if step.stats is not None:
            step.stats = self._stats(step.stats)
        if len(self.outputs) == 1:
            self.outputs[0].send_multipart((OUTPUTS, encoder.encode(step)))
        else:
            by_client: dict[int, list[EngineCoreOutput]] = {}
            for out in step.outputs:
                by_client.setdefault(self.client_of.get(out.request_id, 0), []).append(out)
            for client, outs in by_client.items():
                message = EngineCoreOutputs(outputs=outs, timestamp=step.timestamp, stats=step.stats)
                self.outputs[client].send_multipart((OUTPUTS, encoder.encode(message)))
        for out in step.outputs:
            if out.finish_reason is not None and out.request_id not in self.core.requests:
                self.client_of.pop(out.request_id, None)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
