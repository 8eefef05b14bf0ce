"""deploy=slurm: job.sbatch (resources, optional model download) and node.sh (one torchrun per node).

srun starts node.sh once per node; node 0 (the first host of the job's node list) is the
rendezvous and serves the API, whose URL the job prints. submit() calls sbatch.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Any

from launcher.plan import Plan
from launcher.render import Artefact, ShellExpr
from launcher.schema import SlurmDeploy
from launcher.targets._common import engine_summary, extra_env, key_env_check, summary, torchrun_lines

log = logging.getLogger(__name__)


def _deploy(plan: Plan) -> SlurmDeploy:
    assert isinstance(plan.cfg.deploy, SlurmDeploy)
    return plan.cfg.deploy


def log_paths(plan: Plan, job_id: str) -> tuple[str, str]:
    """stdout and stderr files of job job_id."""
    return str(plan.job_dir / f"slurm-{job_id}.out"), str(plan.job_dir / f"slurm-{job_id}.err")


def context(plan: Plan) -> dict[str, Any]:
    d, m = _deploy(plan), plan.cfg.model
    sbatch = [f"--job-name={plan.name}", f"--nodes={plan.nnodes}", "--ntasks-per-node=1",
              f"--cpus-per-task={d.cpus_per_task}", f"--mem={d.mem}", f"--time={d.time}"]
    if plan.use_gpus:
        sbatch.append(f"--gpus-per-node={plan.nproc_per_node}")
    sbatch += [f"--{key}={getattr(d, key)}" for key in ("partition", "account", "qos", "constraint") if getattr(d, key)]
    if d.exclusive:
        sbatch.append("--exclusive")
    out, err = log_paths(plan, "%j")
    sbatch += [f"--output={out}", f"--error={err}", f"--chdir={plan.job_dir}"]
    sbatch += list(d.extra_sbatch)
    key_env = key_env_check(plan)
    predownload = d.predownload and plan.model_kind == "hub"
    return {
        "summary": summary(plan),
        "engine_summary": engine_summary(plan),
        "sbatch_options": sbatch,
        "setup": list(d.setup),
        "check_key_env": key_env is not None,
        "key_env": key_env,
        "env": extra_env(plan),
        "master_addr_command": d.master_addr_command,
        "predownload": predownload,
        "hub_id": m.path if predownload else "",
        "model_dir": plan.host_model_path or "",
        "api_port": plan.cfg.server.port,
        "nnodes": plan.nnodes,
        "node_script": str(plan.job_dir / "node.sh"),
        "python": d.python,
        "torchrun": torchrun_lines(plan, str(plan.job_dir / "engine.yaml"), node_rank=ShellExpr('"$SLURM_NODEID"'),
                                   master_addr=ShellExpr('"$MASTER_ADDR"'), nnodes=ShellExpr('"$SLURM_NNODES"')),
    }


def artefacts(plan: Plan) -> list[Artefact]:
    ctx = context(plan)
    return [Artefact("slurm/job.sbatch.j2", "job.sbatch", ctx, executable=True),
            Artefact("slurm/node.sh.j2", "node.sh", ctx, executable=True)]


def submit(plan: Plan) -> int:
    """sbatch job.sbatch; print the job id and its log files."""
    key_env = key_env_check(plan)
    if key_env and not os.environ.get(key_env):
        log.error("server.api_key_env: %s is not set; the job would stop at once (export it, or server=noauth)", key_env)
        return 2
    if shutil.which("sbatch") is None:
        log.error("sbatch not found; submit by hand: sbatch %s", plan.job_dir / "job.sbatch")
        return 1
    done = subprocess.run(["sbatch", "--parsable", str(plan.job_dir / "job.sbatch")], cwd=plan.job_dir,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        log.error("sbatch failed (%d): %s", done.returncode, done.stderr.strip())
        return done.returncode
    job_id = done.stdout.strip().split(";")[0]
    out, err = log_paths(plan, job_id)
    print(f"slurm job: {job_id}")
    print(f"stdout: {out}")
    print(f"stderr: {err}")
    return 0
