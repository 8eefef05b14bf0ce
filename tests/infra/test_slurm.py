"""The generated sbatch job on a real one-node Slurm cluster: the embedded SmolLM2 on CPU,
served by one process and by a two-process gloo group, asked for a chat completion,
then scancel'ed; the job must end CANCELLED with no process or port left behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from .jobs import REPO_ROOT, api_address_from_log, chat_completion, port_closed, render_job, tail, wait_ready
from .procs import free_port, processes_mentioning, wait_for
from .slurm import SlurmCluster

pytestmark = pytest.mark.infra

READY_TIMEOUT_S = 420


def test_cluster_runs_a_batch_step(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\n#SBATCH --output=hello-%j.out\nsrun hostname\n")
    job_id = slurm_cluster.sbatch(script, cwd=tmp_path)
    info = slurm_cluster.wait_final(job_id, 120)
    assert info["JobState"] == "COMPLETED", info
    assert Path(info["StdOut"]).read_text().split() == [slurm_cluster.node]


@pytest.mark.parametrize("parallel", [
    pytest.param("tp1", id="one-process"),
    # SmolLM2 has 9 attention heads and 3 KV heads, so its two-process group is a pipeline.
    pytest.param("pp2", id="two-process-gloo-pp2"),
])
def test_generated_sbatch_serves_chat(slurm_cluster: SlurmCluster, tmp_path: Path, parallel: str) -> None:
    port = free_port()
    job_dir = render_job(
        tmp_path / "jobs", "deploy=slurm", "engine=cpu", "server=noauth", f"parallel={parallel}",
        f"job_name=gantry-infra-{parallel}", f"server.port={port}",
        f"deploy.cpus_per_task={os.cpu_count()}", "deploy.mem=4G", "deploy.time=00:30:00",
        f"deploy.python={sys.executable}")
    sbatch = job_dir / "job.sbatch"
    assert sbatch.exists(), sorted(p.name for p in job_dir.iterdir())

    # The job's ranks import gantry from this checkout whether or not it is pip-installed.
    job_id = slurm_cluster.sbatch(sbatch, cwd=job_dir, env={"PYTHONPATH": str(REPO_ROOT)})
    info = slurm_cluster.job(job_id)
    stdout, stderr = Path(info["StdOut"]), Path(info["StdErr"])

    def diagnose() -> str:
        return f"{slurm_cluster.job(job_id)}\n{tail(stdout)}\n{tail(stderr)}"

    def running() -> bool:
        return slurm_cluster.job_state(job_id) in ("PENDING", "CONFIGURING", "RUNNING")

    try:
        # The job names its first node, which is this host (resolved to loopback here).
        logged = wait_for(lambda: stdout.exists() and api_address_from_log(stdout.read_text()), 120,
                          "the job to log its API URL", diagnose)
        assert logged == (slurm_cluster.node, port), tail(stdout)
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, READY_TIMEOUT_S, running, diagnose)
        assert slurm_cluster.job_state(job_id) == "RUNNING"
        chat_completion(base_url)
    finally:
        slurm_cluster.cancel(job_id)

    final = slurm_cluster.wait_final(job_id, 120)
    assert final["JobState"] == "CANCELLED", f"{final}\n{diagnose()}"
    assert job_id not in [int(line.split()[0]) for line in slurm_cluster.queue()]
    wait_for(lambda: not processes_mentioning(str(job_dir)), 60, f"the processes of job {job_id} to exit",
             lambda: "\n".join(processes_mentioning(str(job_dir))))
    assert port_closed(port), f"port {port} still open after the job ended"
