"""`python -m launcher.torchrun ARGS`: torch.distributed.run with the same arguments, stopped gracefully
and reported in one line. Every target's script runs it (Docker, Kubernetes, Slurm, local).

A first SIGTERM/SIGINT goes to local rank 0 only: the server drains and tells the other ranks to stop
(the engine's own shutdown), so the group exits 0. A node without rank 0 waits for that; a second
signal is torchrun's own stop. Either way no agent traceback: a failed rank is one line naming it
below the rank's own error, and the agent's warnings (OMP_NUM_THREADS banner, closing signals) are hidden.
Imports torch only inside main(): the launcher uses the /proc helpers without it.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

Handler = Callable[[int, "FrameType | None"], None]


def children(parent: int) -> list[int]:
    """Pids whose parent is `parent`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # it exited meanwhile
        if int(fields[1]) == parent:
            pids.append(int(entry))
    return pids


def rank_of(pid: int) -> int | None:
    """RANK in a torchrun worker's environment (None: not a worker, or gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    except OSError:
        return None
    rank = env.get(b"RANK", b"")
    return int(rank) if rank.isdigit() else None


def rank0_first(torchrun_handler: Handler) -> Handler:
    """A signal handler for the agent: the first stop signal goes to local rank 0 (or, on a node
    without it, waits for rank 0 to end the group); the next is torchrun's own (stop every worker)."""
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if received:
            torchrun_handler(signum, frame)
            return
        received.append(signum)
        workers = {pid: rank_of(pid) for pid in children(os.getpid())}
        rank0 = [pid for pid, rank in workers.items() if rank == 0]
        if rank0:
            try:
                os.kill(rank0[0], signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)
                return
            except ProcessLookupError:
                pass  # gone already: torchrun's own stop
        elif any(rank is not None for rank in workers.values()):
            return  # rank 0 is on another node: its shutdown message stops these workers
        torchrun_handler(signum, frame)

    return handler


class _AgentNoise(logging.Filter):
    """Drops torchrun agent records below ERROR, and its "failed (exitcode" line that ours replaces."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("torch.distributed"):
            return True
        return record.levelno >= logging.ERROR and not str(record.msg).startswith("failed (exitcode")


def _signal_name(code: int) -> str:
    try:
        return f" ({signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the group; 0 when every rank exited 0, else the first failed rank's code (128 + signal)."""
    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    for name in ("torch", "torch.distributed"):  # where torch installs its stderr handlers
        for log_handler in logging.getLogger(name).handlers:
            log_handler.addFilter(_AgentNoise())
    # torchrun installs this module-level handler when it starts the workers: ours goes in its place
    api._terminate_process_handler = rank0_first(api._terminate_process_handler)  # type: ignore[assignment]
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except api.SignalException as e:  # stopped by a signal: whoever sent it knows
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()  # the root cause: torchrun stopped the other ranks
        code = failure.exitcode
        print(f"gantry: rank {rank} exited with code {code}{_signal_name(code)} (its error is above)", file=sys.stderr)
        return code if code > 0 else 128 - code
    except RendezvousError as e:
        print(f"gantry: torchrun rendezvous failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before torchrun's handlers were installed
        sys.exit(130)
