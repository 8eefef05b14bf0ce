"""Stand-in for `python -m engine.serve` in the local target's signal tests (deploy.module).

Each rank records its pid beside engine.yaml (ranks/<RANK>.pid) and waits. By default it
exits on SIGTERM/SIGINT; with STANDIN_STUBBORN=1 it ignores them, and rank 0 also leaves a
grandchild in its own session that ignores SIGTERM: the orphans the launcher must not leave.
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
    time.sleep(600)


if __name__ == "__main__":
    main()
