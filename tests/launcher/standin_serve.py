"""Stand-in for `python -m engine.serve` in the local target's signal tests (deploy.module).

Each rank records its pid beside engine.yaml (ranks/<RANK>.pid) and waits. By default rank 0
exits 0 on SIGTERM/SIGINT and the other ranks exit 0 once rank 0 is gone (the engine's shutdown
message, in miniature); with STANDIN_STUBBORN=1 they ignore both, and rank 0 also leaves a
grandchild in its own session that ignores SIGTERM: the orphans the launcher must not leave.
STANDIN_CONFIG_ERROR=1: rank 0 fails as engine.serve does on a bad config (one line, exit 2).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as f:
        assert set(yaml.safe_load(f)) == {"engine", "server"}
    rank = int(os.environ["RANK"])
    if rank == 0 and os.environ.get("STANDIN_CONFIG_ERROR") == "1":
        time.sleep(1)  # the other ranks have started by now
        print("engine.serve: config error: engine.standin: refused by the stand-in", file=sys.stderr)
        sys.exit(2)
    ranks = Path(args.config).parent / "ranks"
    ranks.mkdir(exist_ok=True)
    stubborn = os.environ.get("STANDIN_STUBBORN") == "1"
    pids = [os.getpid()]
    if stubborn:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        if rank == 0:
            child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                      "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                                     start_new_session=True)
            pids.append(child.pid)
    else:
        def stop(signum: int, _frame: FrameType | None) -> None:
            sys.exit(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
    (ranks / f"{rank}.pid.tmp").write_text(" ".join(map(str, pids)))
    (ranks / f"{rank}.pid.tmp").rename(ranks / f"{rank}.pid")
    if rank == 0 or stubborn:
        time.sleep(600)
        return
    while not (ranks / "0.pid").exists():
        time.sleep(0.1)
    rank0 = int((ranks / "0.pid").read_text().split()[0])
    while is_alive(rank0):
        time.sleep(0.2)


def is_alive(pid: int) -> bool:
    """Running and not a zombie (rank 0 is one until torchrun reaps it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:  # gone: no file, or ESRCH when it exits between open and read
        return False


if __name__ == "__main__":
    main()
