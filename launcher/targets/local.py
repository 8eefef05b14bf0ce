"""deploy=local: render run.sh (torchrun here, through launcher.torchrun) and run it in the foreground.

Ctrl-C or SIGTERM is forwarded to the torchrun agent, which hands it to rank 0 (the server drains
and stops the other ranks: exit 0, no traceback); a second signal after server.shutdown_grace_s
makes the agent stop every rank. Ranks still alive after deploy.stop_timeout_s, or orphaned by a
dying agent, are killed: the launcher is their child subreaper.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from launcher.plan import Plan
from launcher.render import Artefact
from launcher.schema import LocalDeploy
from launcher.targets._common import (engine_summary, extra_env, key_env_check, key_env_to_unset, summary,
                                      torchrun_lines)
from launcher.torchrun import children

log = logging.getLogger(__name__)
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
REAP_GRACE_S = 5.0  # orphans get this long between SIGTERM and SIGKILL
AGENT_AFTER_S = 10.0  # after rank 0's drain (server.shutdown_grace_s), this long before the agent is told too


def _deploy(plan: Plan) -> LocalDeploy:
    assert isinstance(plan.cfg.deploy, LocalDeploy)
    return plan.cfg.deploy


def context(plan: Plan) -> dict[str, Any]:
    d = _deploy(plan)
    env = extra_env(plan)
    if d.cuda_visible_devices is not None:
        env = [("CUDA_VISIBLE_DEVICES", d.cuda_visible_devices)] + env
    rank = str(d.node_rank) if d.node_rank is not None else None
    return {
        "summary": summary(plan),
        "engine_summary": engine_summary(plan),
        "env": env,
        "key_env": key_env_check(plan),
        "check_key_env": key_env_check(plan) is not None,
        "unset_key_env": key_env_to_unset(plan),
        "python": d.python or sys.executable,
        "torchrun": torchrun_lines(plan, str(plan.job_dir / "engine.yaml"), node_rank=rank, master_addr=d.master_addr),
    }


def artefacts(plan: Plan) -> list[Artefact]:
    return [Artefact("local/run.sh.j2", "run.sh", context(plan), executable=True)]


def _become_subreaper() -> bool:
    """Orphaned descendants (torchrun starts each rank in its own session) become our children."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def _reap_all() -> None:
    """Wait for every child; SIGTERM then SIGKILL those that do not exit."""
    deadline = None
    while pids := children(os.getpid()):
        for pid in pids:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    continue
            except ChildProcessError:
                continue
            if deadline is None:
                log.warning("stopping %d leftover rank process(es)", len(pids))
                deadline = time.monotonic() + REAP_GRACE_S
            sig = signal.SIGKILL if time.monotonic() > deadline else signal.SIGTERM
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def run_foreground(argv: list[str], stop_timeout_s: float, agent_after_s: float = 40.0) -> int:
    """Run argv (it execs the torchrun agent) in its own session until it exits; Ctrl-C/SIGTERM stop it
    (the agent hands the first to rank 0, the second after agent_after_s stops every rank; SIGKILL
    after stop_timeout_s); kill leftovers.
    The exit status: the group's, or 128 + the signal when a stop did not end in status 0."""
    _become_subreaper()
    proc = subprocess.Popen(argv, start_new_session=True)
    stopping: list[tuple[int, float]] = []  # (signal, when) of the first stop request

    def forward(signum: int, _frame: FrameType | None) -> None:
        if stopping:  # a second Ctrl-C: no more patience
            _signal_group(proc.pid, signal.SIGKILL)
            return
        log.info("%s: stopping the torchrun group (up to %.0f s)", signal.Signals(signum).name, stop_timeout_s)
        stopping.append((signum, time.monotonic()))
        _signal_group(proc.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    agent_told = False
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if not stopping:
                    continue
                waited = time.monotonic() - stopping[0][1]
                if waited > stop_timeout_s:
                    log.warning("the group did not stop in %.0f s: SIGKILL", stop_timeout_s)
                    _signal_group(proc.pid, signal.SIGKILL)
                elif waited > min(agent_after_s, stop_timeout_s / 2) and not agent_told:
                    agent_told = True  # rank 0 is done or stuck: torchrun's own stop of whatever is left
                    _signal_group(proc.pid, signal.SIGTERM)
        _reap_all()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if stopping and code:
        return 128 + stopping[0][0]
    return 128 - code if code < 0 else code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def submit(plan: Plan) -> int:
    """Run run.sh in the foreground; its exit status."""
    key_env = key_env_check(plan)
    if key_env and not os.environ.get(key_env):
        log.error("server.api_key_env: environment variable %s is not set (export it, or use server=noauth)", key_env)
        return 2
    script = Path(plan.job_dir) / "run.sh"
    log.info("running %s (Ctrl-C stops every rank)", script)
    return run_foreground(["bash", str(script)], _deploy(plan).stop_timeout_s,
                          agent_after_s=plan.cfg.server.shutdown_grace_s + AGENT_AFTER_S)
