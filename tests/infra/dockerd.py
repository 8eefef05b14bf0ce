"""A private Docker engine (Debian's docker.io dockerd) for the infra tests.

Its data root, exec root, pid file and socket live in one temporary directory, so it
never touches another daemon's images or containers. No bridge and no iptables rules:
containers use `--network host`, builds use `--network host`, nothing is ever pulled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from .procs import stop_process, wait_for

DOCKER_TOOLS = ("dockerd", "containerd", "runc", "docker")


class DockerError(RuntimeError):
    """A docker command failed; carries its output."""


class DockerEngine:
    """dockerd on a private socket; `env` points the docker CLI (and run.sh scripts) at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self._proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def env(self) -> dict[str, str]:
        # The legacy builder resolves FROM against local images only, with no registry lookup.
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0",
                "DOCKER_CONFIG": str(self.root / "client")}

    def start(self, timeout: float = 60.0) -> None:
        (self.root / "client").mkdir(parents=True, exist_ok=True)
        log = open(self.root / "dockerd.log", "wb")
        self._proc = subprocess.Popen(
            [shutil.which("dockerd") or "dockerd",
             "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
             "--pidfile", str(self.root / "docker.pid"), "--host", self.host,
             "--bridge", "none", "--iptables=false", "--ip-forward=false", "--ip-masq=false"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

        def answers() -> bool:
            if self._proc.poll() is not None:
                raise DockerError(f"dockerd exited with {self._proc.returncode}\n{self.log_tail()}")
            return self.docker("info", check=False).returncode == 0

        wait_for(answers, timeout, "dockerd to answer `docker info`", self.log_tail)

    def stop(self) -> None:
        if self._proc is None:
            return
        running = self.docker("ps", "-q", check=False).stdout.split()
        if running:
            self.docker("rm", "-f", *running, check=False)
        stop_process(self._proc, grace=30)
        self._proc = None
        self._unmount_leftovers()

    def _unmount_leftovers(self) -> None:
        """dockerd leaves its exec root's netns bind mount behind; unmount all under root."""
        prefix = f"{self.root}/"
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for target in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", target], check=False)

    def docker(self, *args: str, check: bool = True, timeout: float = 120,
               cwd: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, env=self.env,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise DockerError(f"docker {' '.join(args)} exited {proc.returncode}:\n"
                              f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def has_image(self, ref: str) -> bool:
        return self.docker("image", "inspect", ref, check=False).returncode == 0

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "dockerd.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "--- dockerd.log\n" + "\n".join(text.splitlines()[-lines:])
