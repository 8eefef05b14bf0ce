"""Process groups for tensor and pipeline parallel, built from torchrun's environment.

Ranks are laid out pp-major: rank = pp_rank * tp_size + tp_rank, so a TP group is a
contiguous run of ranks (one node when tp <= GPUs per node). A single process needs no
torch.distributed at all: every helper here is then the identity.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from engine.symm_all_reduce import SymmMemAllReduce

logger = logging.getLogger("gantry.engine")


@dataclass
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_group: dist.ProcessGroup | None = None  # device collectives (NCCL on GPU, gloo on CPU)
    pp_group: dist.ProcessGroup | None = None  # send/recv between neighbouring stages
    cpu_group: dist.ProcessGroup | None = None  # gloo: control messages (SchedulerOutput, token ids)
    symm_all_reduce: SymmMemAllReduce | None = None  # decode-sized TP all-reduces over NVLink (CUDA)
    timeout_s: float = 0.0  # distributed_timeout_s

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


def set_parallel_state(state: ParallelState) -> None:
    global _STATE
    _STATE = state


def check_world_size(tp_size: int, pp_size: int) -> int:
    """The torchrun group's size, which must be tp x pp; a ConfigError saying how to start it."""
    from engine.config import ConfigError

    need = tp_size * pp_size
    param = "pipeline_parallel_size" if pp_size > 1 and tp_size == 1 else "tensor_parallel_size"
    sizes = f"tensor_parallel_size {tp_size} x pipeline_parallel_size {pp_size} = {need} ranks"
    if "WORLD_SIZE" not in os.environ:
        if need > 1:
            raise ConfigError(param, f"{sizes}, and this process is not part of a torchrun group: start one "
                              f"with `torchrun --nproc-per-node {need} -m engine.serve ...` (across nodes: "
                              f"--nnodes x --nproc-per-node = {need})")
        return 1
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != need:
        raise ConfigError(param, f"{sizes}, but torchrun started {world_size} (WORLD_SIZE): make --nnodes x "
                          f"--nproc-per-node equal {need}, or change the sizes")
    return world_size


def init_distributed(tp_size: int, pp_size: int, device: torch.device, timeout_s: float) -> ParallelState:
    """Join the torchrun group (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) and build the groups."""
    world_size = check_world_size(tp_size, pp_size)
    if world_size == 1:
        set_parallel_state(ParallelState())
        return _STATE
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    cpu_world = dist.new_group(list(range(world_size)), backend="gloo", timeout=timeout)
    tp_group = pp_group = None
    for pp in range(pp_size):
        ranks = [pp * tp_size + t for t in range(tp_size)]
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        if rank in ranks:
            tp_group = group
    for t in range(tp_size):
        ranks = [pp * tp_size + t for pp in range(pp_size)]
        group = dist.new_group(ranks, backend=backend, timeout=timeout)
        if rank in ranks:
            pp_group = group
    state = ParallelState(
        tp_rank=rank % tp_size, tp_size=tp_size, pp_rank=rank // tp_size, pp_size=pp_size,
        rank=rank, world_size=world_size, local_rank=local_rank,
        tp_group=tp_group, pp_group=pp_group, cpu_group=cpu_world, timeout_s=timeout_s,
    )
    from engine import symm_all_reduce

    fast = symm_all_reduce.build(tp_group, tp_size, device)
    ok = torch.tensor([int(fast is not None)], dtype=torch.int64)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=cpu_world)  # every rank, or none: same kernels
    state.symm_all_reduce = fast if int(ok.item()) else None
    set_parallel_state(state)
    return state


def destroy_distributed(timeout_s: float = 10.0) -> None:
    """Leave the process group, waiting at most timeout_s. NCCL communicators are aborted, not
    destroyed: on two H200s destroy_process_group never returned on rank 0 (its finalize waits on
    peers that had already left, or on communicators held by captured CUDA graphs), and the thread
    left blocked in it made the interpreter abort at exit ("terminate called without an active
    exception"). The device gets a few seconds to drain first, polled rather than synchronized: a
    collective still waiting for a peer that left would block a synchronize for ever, and the abort
    is what ends such a kernel."""
    if not dist.is_initialized():
        return
    done = threading.Event()
    nccl = dist.get_backend() == "nccl"
    if nccl:
        drained = torch.cuda.Event()
        drained.record()
        deadline = time.monotonic() + min(5.0, timeout_s / 2)
        while not drained.query() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not drained.query():
            logger.warning("work was still queued on the device at shutdown (a collective whose peer left?); "
                           "aborting the communicators")

    def destroy() -> None:
        try:
            if nccl:
                dist.distributed_c10d._abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception:  # peers are gone; nothing to tell them
            logger.debug("leaving the process group failed", exc_info=True)
        done.set()

    thread = threading.Thread(target=destroy, name="gantry-destroy-group", daemon=True)
    thread.start()
    if not done.wait(timeout_s):
        frame = sys._current_frames().get(thread.ident)
        where = "".join(traceback.format_stack(frame)[-3:]).strip() if frame else "?"
        logger.info("the process group did not tear down within %.0f s; its communicators are freed at exit "
                    "(blocked in: %s)", timeout_s, where)


def wait_for_event(event: torch.cuda.Event) -> None:
    """Wait until a step's work on this device is done. A symmetric-memory all-reduce waiting for a
    dead peer spins for ever (no NCCL watchdog aborts it), so with those kernels in use the wait polls
    and gives up after distributed_timeout_s with an error, which the executor turns into one naming
    the silent ranks. The polling costs nothing with async scheduling: the next step is queued."""
    state = _STATE
    if state.symm_all_reduce is None or event.query():
        event.synchronize()
        return
    deadline = time.monotonic() + state.timeout_s
    while not event.query():
        if time.monotonic() > deadline:
            raise RuntimeError(f"a step did not finish within distributed_timeout_s ({state.timeout_s:.0f} s): "
                               "a tensor-parallel peer stopped")
        time.sleep(50e-6)


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    state = _STATE
    if state.tp_size == 1:
        return x
    fast = state.symm_all_reduce
    if fast is not None and fast.can_reduce(x):
        return fast(x)
    dist.all_reduce(x, group=state.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every TP rank's x along dim."""
    state = _STATE
    if state.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(state.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=state.tp_group)
    return torch.cat(parts, dim=dim)


def broadcast_from_first_tp_rank(x: torch.Tensor) -> None:
    """Overwrite x on every rank of this TP group with the group's first rank's x (in place)."""
    state = _STATE
    src = dist.get_global_rank(state.tp_group, 0)
    dist.broadcast(x, src, group=state.tp_group)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        from engine.config import ConfigError

        raise ConfigError("tensor_parallel_size", f"{what} ({numerator}) is not divisible by {denominator}")
    return numerator // denominator
