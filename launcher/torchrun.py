"""`python -m launcher.torchrun ARGS`: torch.distributed.run with the same arguments, for deploy=local.

What a user reads at the console changes, nothing else: a stop signal ends it without the agent's
traceback (exit 128 + signal), a failed rank is one line naming the rank and its exit code below
the rank's own error line (not ChildFailedError's 25-line report), and the agent's warnings
(OMP_NUM_THREADS banner, "closing signal" lines) are hidden.
"""
from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence


class _AgentNoise(logging.Filter):
    """Drops torchrun agent records below ERROR, and its "failed (exitcode" line that ours replaces."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("torch.distributed"):
            return True
        return record.levelno >= logging.ERROR and not str(record.msg).startswith("failed (exitcode")


def _quiet_agent() -> None:
    for name in ("torch", "torch.distributed"):  # where torch installs its stderr handlers
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_AgentNoise())


def _signal_name(code: int) -> str:
    try:
        return f" ({signal.Signals(-code).name})" if code < 0 else ""
    except ValueError:
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the group; 0 when every rank exited 0, else the first failed rank's code (128 + signal)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    _quiet_agent()
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except SignalException as e:  # the launcher stopped the group: its own line said so
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
    except KeyboardInterrupt:  # Ctrl-C while torch was still importing
        sys.exit(130)
