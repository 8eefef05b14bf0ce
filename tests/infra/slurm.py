"""A throw-away one-node Slurm cluster (munged, slurmctld, slurmd) for the infra tests.

Everything lives in one directory: key, sockets, slurm.conf, state, spool and logs,
so clusters of concurrent test sessions never meet. Needs root and Debian's packages
slurmctld, slurmd, slurm-client and munge; no systemd.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from .procs import free_port, processes_mentioning, stop_process, wait_for

SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel", "scontrol")
# Job states after which Slurm runs nothing more for the job.
FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


class SlurmError(RuntimeError):
    """A Slurm daemon or command did not do what the test needed; carries its log tail."""


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, configured from `slurmd -C`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = socket.gethostname().split(".")[0]
        self.conf_path = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.partition = "gantry"
        self._procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands (sbatch, squeue, ...) aimed at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf_path)}

    def start(self, timeout: float = 60.0) -> None:
        self._start_munge()
        self._write_conf()
        for name in ("state", "spool"):
            (self.root / name).mkdir(exist_ok=True)
        self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf_path)])
        wait_for(lambda: self._run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                 "slurmctld to answer `scontrol ping`", self._diagnose)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf_path), "-N", self.node])
        wait_for(self._node_idle, timeout, f"node {self.node} to be idle in sinfo", self._diagnose)

    def stop(self) -> None:
        if "slurmctld" in self._procs:
            self._run(["scancel", "--full", "--partition", self.partition], check=False)
            try:
                wait_for(lambda: not self.queue(), 30, "the queue to drain")
            except TimeoutError:
                pass
        for name in ("slurmd", "slurmctld"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                stop_process(proc)
        self._kill_stepds()
        proc = self._procs.pop("munged", None)
        if proc is not None:
            stop_process(proc)

    # -- jobs -----------------------------------------------------------------------------

    def sbatch(self, script: Path, cwd: Path, env: dict[str, str] | None = None) -> int:
        """Submit `script` from `cwd`; returns the job id."""
        out = self._run(["sbatch", "--parsable", str(script)], cwd=cwd, env=env).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, StdOut, NodeList, ...)."""
        out = self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        fields = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def job_state(self, job_id: int) -> str:
        return self.job(job_id)["JobState"]

    def wait_final(self, job_id: int, timeout: float) -> dict[str, str]:
        """Wait until the job reached a final state; returns its last `scontrol show job`."""
        wait_for(lambda: self.job_state(job_id) in FINAL_STATES, timeout,
                 f"job {job_id} to end", lambda: str(self.job(job_id)))
        return self.job(job_id)

    def queue(self) -> list[str]:
        out = self._run(["squeue", "-h", "-o", "%i %T"], check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def cancel(self, job_id: int) -> None:
        self._run(["scancel", str(job_id)])

    # -- internals ------------------------------------------------------------------------

    def _start_munge(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._spawn("munged", [
            "munged", "--foreground", "--force",
            f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}",
            f"--log-file={munge_dir / 'munged.log'}",
        ])
        wait_for(self.munge_socket.exists, 20, "munged's socket", self._diagnose)

    def _write_conf(self) -> None:
        # `slurmd -C` prints this host's real node line (CPUs, sockets, cores, RealMemory).
        hw = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
        node_line = next(line for line in hw.splitlines() if line.startswith("NodeName="))
        node_line = re.sub(r"^NodeName=\S+", f"NodeName={self.node} NodeAddr=127.0.0.1", node_line)
        r = self.root
        conf = f"""\
ClusterName=gantry-infra
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=15
InactiveLimit=0
{node_line} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        self.conf_path.write_text(conf)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.out", "wb")
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=self.env,
                                             start_new_session=True)

    def _node_idle(self) -> bool:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmError(f"{name} exited with {proc.returncode}\n{self._diagnose()}")
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout
        return f"{self.node} idle" in out

    def _kill_stepds(self) -> None:
        """slurmstepd processes of this cluster can outlive slurmd while a job is dying."""
        for line in processes_mentioning("slurmstepd"):
            pid = int(line.split()[0])
            try:
                if str(self.conf_path).encode() in Path(f"/proc/{pid}/environ").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def _run(self, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd,
                              env={**self.env, **(env or {})}, timeout=60)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def _diagnose(self) -> str:
        parts = []
        for name in ("munge/munged.log", "slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out"):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                parts.append(f"--- {name}\n" + "\n".join(tail))
        return "\n".join(parts)


