"""The project's Dockerfile on a real Docker engine: the CPU image builds with no registry,
and the generated run.sh starts a container that serves a chat completion."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from .dockerd import DockerEngine
from .jobs import api_address_from_log, chat_completion, port_closed, render_job, wait_ready
from .procs import free_port, wait_for

# The first test also builds the image (about 2 minutes, more with a cold wheelhouse).
pytestmark = [pytest.mark.infra, pytest.mark.timeout(1200)]

READY_TIMEOUT_S = 420


def test_image_has_gantry_torch_and_the_embedded_model(docker_engine: DockerEngine, gantry_image: str) -> None:
    probe = ("import torch, engine, launcher; from engine.model_config import default_model_path; "
             "print(torch.__version__); print(default_model_path())")
    out = docker_engine.docker("run", "--rm", "--pull", "never", "--network", "host", gantry_image,
                               "python3", "-c", probe).stdout.split()
    assert out[0] == torch.__version__  # the wheelhouse's torch, pinned to the host's
    assert out[1].endswith(".gguf") and "site-packages" in out[1]


def test_generated_run_script_serves_chat(docker_engine: DockerEngine, gantry_image: str, tmp_path: Path) -> None:
    port = free_port()
    name = f"gantry-infra-{uuid.uuid4().hex[:8]}"
    job_dir = render_job(
        tmp_path / "jobs", "deploy=docker", "engine=cpu", "server=noauth", "parallel=tp1",
        f"job_name={name}", f"deploy.image={gantry_image}", "deploy.pull=never",
        # No bridge on the test daemon: the API binds the host's loopback directly.
        "deploy.network_host=true", f"server.port={port}", f"deploy.host_port={port}",
        "deploy.shm_size=1g", "deploy.health_interval_s=2", "deploy.health_start_period_s=600")
    script = job_dir / "run.sh"
    assert script.exists(), sorted(p.name for p in job_dir.iterdir())

    started = subprocess.run(["bash", str(script)], env=docker_engine.env, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode == 0, f"run.sh exited {started.returncode}:\n{started.stdout}\n{started.stderr}"
    assert api_address_from_log(started.stdout) == ("localhost", port), started.stdout

    def state(field: str) -> str:
        return docker_engine.docker("inspect", "--format", "{{" + field + "}}", name).stdout.strip()

    def diagnose() -> str:
        logs = docker_engine.docker("logs", "--tail", "40", name, check=False)
        return f"container state: {state('json .State')}\n{logs.stdout}\n{logs.stderr}"

    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, READY_TIMEOUT_S, lambda: state(".State.Running") == "true", diagnose)
        chat_completion(base_url)
        # The health check the script rendered (GET /ready with the image's python) agrees.
        wait_for(lambda: state(".State.Health.Status") == "healthy", 60, "the container to be healthy", diagnose)
        docker_engine.docker("stop", name, timeout=180)
        assert state(".State.Running") == "false"
    finally:
        docker_engine.docker("rm", "--force", name, check=False)

    assert docker_engine.docker("ps", "--all", "--quiet", "--filter", f"name=^{name}$").stdout.strip() == ""
    assert port_closed(port), f"port {port} still open after the container was removed"
