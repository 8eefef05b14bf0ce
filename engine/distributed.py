"""Multi-rank execution: rank 0 schedules and sends each SchedulerOutput to every rank; every
rank runs its layers; the last pipeline stage's first TP rank sends the sampled tokens back.

Rank 0 sends point to point (non-blocking) rather than by a collective, so it can start the
next pipeline batch while later stages still work on the previous one. Control messages go
over a gloo group with a long timeout (workers may idle for hours between requests); results
come back over a gloo group with distributed_timeout_s, so a dead or hung rank is noticed, and
every rank's heartbeat in torchrun's store says which rank it was (RankFailedError, logged).
Workers also watch rank 0's heartbeat, since they wait for its next batch without a timeout.
"""
from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import weakref
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.errors import RankFailedError
from engine.model_runner import ModelRunner, PendingOutput
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from engine.parallel import ParallelState, destroy_distributed, get_parallel_state

logger = logging.getLogger("gantry.engine")

CONTROL_TIMEOUT = timedelta(days=365)
_SHUTDOWN = b"shutdown"
HEARTBEAT_INTERVAL_S = 0.5


class Heartbeat:
    """A daemon thread bumps this rank's counter in torchrun's store every HEARTBEAT_INTERVAL_S.
    A dead or stopped rank stops bumping, which is how a failed collective names the rank at fault
    (gloo's own errors only say that a recv timed out or a connection closed). On workers the
    thread also ends the process when rank 0's counter stands still for timeout_s."""

    def __init__(self, state: ParallelState, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = state.rank, state.world_size, timeout_s
        self.store = dist.distributed_c10d._get_default_store()
        self._stopped = threading.Event()
        self.store.add(self._key(self.rank), 1)  # at once: workers judge rank 0 only after its first beat
        self._thread = threading.Thread(target=self._beat, name="gantry-heartbeat", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @staticmethod
    def _key(rank: int) -> str:
        return f"gantry/heartbeat/{rank}"

    def _beat(self) -> None:
        driver_beats, driver_seen_at = 0, time.monotonic()
        while not self._stopped.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.store.add(self._key(self.rank), 1)
                beats = self.store.add(self._key(0), 0) if self.rank else 0
            except (RuntimeError, OSError):  # the store went away with the group: nobody is left to tell
                return
            now = time.monotonic()
            if beats != driver_beats:
                driver_beats, driver_seen_at = beats, now
            elif beats and now - driver_seen_at > self.timeout_s and not self._stopped.is_set():
                # the main thread may be blocked in a recv from rank 0 that has no timeout: exit from here
                logger.error("rank %d: rank 0 stopped answering (no heartbeat for %.0f s, dead or hung); exiting",
                             self.rank, now - driver_seen_at)
                os._exit(1)

    def silent_ranks(self) -> list[int]:
        """Other ranks whose counter did not move over four beats."""
        try:
            before = [self.store.add(self._key(r), 0) for r in range(self.world_size)]
            time.sleep(4 * HEARTBEAT_INTERVAL_S)
            after = [self.store.add(self._key(r), 0) for r in range(self.world_size)]
        except (RuntimeError, OSError):  # store unreachable (its host is gone): we cannot tell who
            return []
        return [r for r in range(self.world_size) if r != self.rank and before[r] == after[r]]

    def stop(self) -> None:
        """Stop beating and wait (briefly) for the thread: one left inside a store call when the process exits
        (or the store it talks to goes) aborts the process from C++ ("terminate called without an active
        exception")."""
        self._stopped.set()
        _LIVE.discard(self)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)


_LIVE: weakref.WeakSet[Heartbeat] = weakref.WeakSet()  # this process's running heartbeats


def stop_heartbeats() -> None:
    """Every heartbeat of this process stopped: before its process group and store go (a failed group's
    executor never reaches its own shutdown)."""
    for heartbeat in list(_LIVE):
        heartbeat.stop()


class ControlChannel:
    """Pickled objects from rank 0 to every other rank, and from one rank to rank 0."""

    def __init__(self, state: ParallelState, timeout_s: float):
        self.state = state
        ranks = list(range(state.world_size))
        self.control_group = dist.new_group(ranks, backend="gloo", timeout=CONTROL_TIMEOUT)
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self.heartbeat = Heartbeat(state, timeout_s)

    def failure(self, what: str, error: Exception) -> RankFailedError:
        """Log and return the error for a failed exchange, naming the ranks that stopped beating."""
        silent = self.heartbeat.silent_ranks()
        if silent:
            who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering (dead or hung)"
        else:
            who = "every rank still beats (a peer slower than distributed_timeout_s?)"
        message = f"rank {self.state.rank}: {what} failed: {who}: {error}"
        logger.error(message)
        return RankFailedError(message)

    def send_to_workers(self, payload: bytes) -> None:
        self._reap()
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        size = torch.tensor([len(payload)], dtype=torch.int64)
        for rank in range(1, self.state.world_size):
            self._pending.append((dist.isend(size, rank, group=self.control_group), size))
            self._pending.append((dist.isend(data, rank, group=self.control_group), data))

    def wait_sent(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    def _reap(self) -> None:
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]

    def recv_from_driver(self) -> bytes:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, 0, group=self.control_group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, 0, group=self.control_group)
        return data.numpy().tobytes()

    def send_result(self, obj: object) -> None:
        """Non-blocking: a gloo send completes only once rank 0 posts its recv, which rank 0 does
        between its own pipeline stages; a blocking send would idle this stage until then."""
        self._reap()
        payload = pickle.dumps(obj)
        size = torch.tensor([len(payload)], dtype=torch.int64)
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        for t in (size, data):
            self._pending.append((dist.isend(t, 0, group=self.state.cpu_group), t))

    def recv_result(self, src: int) -> object:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src, group=self.state.cpu_group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, src, group=self.state.cpu_group)
        return pickle.loads(data.numpy().tobytes())


def min_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_parallel_state().cpu_group)
    return int(t.item())


def result_rank(state: ParallelState) -> int:
    """The rank that reports sampled tokens: first TP rank of the last pipeline stage."""
    return (state.pp_size - 1) * state.tp_size


class MultiprocExecutor:
    """Rank 0's side. submit() returns once rank 0's own stage is queued on its device; collect()
    waits for the oldest batch's tokens, so several batches can be in flight: PP lanes, or with
    tp > 1 and async scheduling the next step while this one runs (rank 0 samples then)."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.state = get_parallel_state()
        self.channel = ControlChannel(self.state, runner.config.distributed_timeout_s)
        self.in_flight: deque[PendingOutput | None] = deque()  # None: a later stage reports
        self.send_seconds = 0.0  # time spent pickling and sending SchedulerOutputs (measured)
        self.num_sends = 0

    def determine_num_blocks(self) -> int:
        return min_over_ranks(self.runner.determine_num_blocks())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def submit(self, so: SchedulerOutput) -> None:
        start = time.perf_counter()
        self.channel.send_to_workers(pickle.dumps(so))
        self.send_seconds += time.perf_counter() - start
        self.num_sends += 1
        try:  # the forward's TP all-reduce and PP send wait on peers
            self.in_flight.append(self.runner.submit_model(so))
        except RuntimeError as e:
            raise self.channel.failure("the forward pass", e) from e

    def collect(self) -> ModelRunnerOutput:
        local = self.in_flight.popleft()
        if local is not None:
            try:
                return local.get()
            except RuntimeError as e:
                raise self.channel.failure("the forward pass", e) from e
        src = result_rank(self.state)
        try:
            return self.channel.recv_result(src)
        except RuntimeError as e:
            raise self.channel.failure(f"waiting for the sampled tokens from rank {src}", e) from e

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.submit(so)
        return self.collect()

    def shutdown(self) -> None:
        self.channel.send_to_workers(_SHUTDOWN)
        self.channel.wait_sent()
        self.channel.heartbeat.stop()
        self.in_flight.clear()
        self.runner.release()
        destroy_distributed()


def run_worker(config: EngineConfig, show_progress: bool = False) -> None:
    """Every rank but 0: load this rank's shard, then run whatever rank 0 sends until told to stop."""
    from engine.llm_engine import resolve_device
    from engine.model_config import resolve_model_config
    from engine.parallel import init_distributed

    device = resolve_device(config)
    state = init_distributed(config.tensor_parallel_size, config.pipeline_parallel_size, device, config.distributed_timeout_s)
    model_config = resolve_model_config(config, device)
    runner = ModelRunner(config, model_config, device, show_progress)
    channel = ControlChannel(state, config.distributed_timeout_s)
    runner.allocate_kv_cache(min_over_ranks(runner.determine_num_blocks()))
    reports = state.rank == result_rank(state)
    logger.info("rank %d (tp %d/%d, pp %d/%d) ready", state.rank, state.tp_rank, state.tp_size, state.pp_rank, state.pp_size)
    while True:
        try:
            payload = channel.recv_from_driver()
        except RuntimeError as e:  # rank 0 is gone (its connection closed)
            raise channel.failure("waiting for rank 0's next batch", e) from e
        if payload == _SHUTDOWN:
            break
        try:
            if reports:
                channel.send_result(runner.execute_model(pickle.loads(payload)))
            else:  # queued on the device; the next recv overlaps it (rank 0 reports the tokens)
                runner.submit_model(pickle.loads(payload))
        except RuntimeError as e:
            raise channel.failure("the forward pass", e) from e
    logger.info("rank %d: shut down by rank 0", state.rank)
    channel.heartbeat.stop()
    channel.wait_sent()
    destroy_distributed()
