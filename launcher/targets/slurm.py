"""deploy=slurm: job.sbatch (resources, a weights check) and node.sh (one torchrun per node).

srun starts node.sh once per node; node 0 (the first host of the job's node list) is the
rendezvous and serves the API, whose URL the job prints. Job files refer to each other through
the job directory ($SLURM_SUBMIT_DIR, node.sh's own directory), so it can be moved or copied;
only the weights' path is absolute. submit() calls sbatch from the job directory.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from typing import Any

from launcher.plan import Plan
from launcher.render import Artefact, ShellExpr
from launcher.schema import SlurmDeploy
from launcher.targets._common import (engine_summary, extra_env, key_env_check, key_env_to_unset, summary,
                                      torchrun_lines)
from launcher.weights import fetch_command, model_kind, weights_key

log = logging.getLogger(__name__)
LOG_NAME = "slurm-{job_id}.{stream}"  # relative: the job's working directory is the job directory


def _deploy(plan: Plan) -> SlurmDeploy:
    assert isinstance(plan.cfg.deploy, SlurmDeploy)
    return plan.cfg.deploy


def node_python(d: SlurmDeploy) -> str:
    """deploy.python, or its default: python3 when setup lines prepare the nodes' environment
    (module load, source .../activate); else the rendering virtualenv's or conda env's interpreter,
    which on a cluster lives on the home directory every node mounts; else python3 from PATH."""
    if d.python:
        return d.python
    in_env = sys.prefix != sys.base_prefix or os.environ.get("CONDA_PREFIX") == sys.prefix
    return sys.executable if in_env and not d.setup else "python3"


def log_paths(plan: Plan, job_id: str) -> tuple[str, str]:
    """stdout and stderr files of job job_id (submitted from the job directory)."""
    out, err = (str(plan.job_dir / LOG_NAME.format(job_id=job_id, stream=s)) for s in ("out", "err"))
    return out, err


def _on_this_node(before: str, after: str) -> ShellExpr:
    """A double-quoted shell word: before + the node's hostname + after, nothing else expanded."""
    def dq(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")

    return ShellExpr(f'"{dq(before)}$(hostname){dq(after)}"')


def _weights_message(plan: Plan) -> ShellExpr:
    fix = (f"on a login node, fetch the weights first: {fetch_command(plan.cfg)}" if model_kind(plan.cfg.model.path) == "hub"
           else "copy the model there first, into a directory every node sees")
    return _on_this_node(f"gantry: {weights_key(plan.cfg)}: {plan.host_model_path} does not exist on ",
                         f" (compute nodes often have no internet: the job does not download); {fix}")


def context(plan: Plan) -> dict[str, Any]:
    d = _deploy(plan)
    sbatch = [f"--job-name={plan.name}", f"--nodes={plan.nnodes}", "--ntasks-per-node=1",
              f"--cpus-per-task={d.cpus_per_task}", f"--mem={d.mem}", f"--time={d.time}"]
    if plan.use_gpus:
        sbatch.append(f"--gpus-per-node={plan.nproc_per_node}")
    sbatch += [f"--{key}={getattr(d, key)}" for key in ("partition", "account", "qos", "constraint") if getattr(d, key)]
    if d.exclusive:
        sbatch.append("--exclusive")
    sbatch += [f"--output={LOG_NAME.format(job_id='%j', stream='out')}", f"--error={LOG_NAME.format(job_id='%j', stream='err')}"]
    sbatch += list(d.extra_sbatch)
    key_env = key_env_check(plan)
    python = node_python(d)
    return {
        "summary": summary(plan),
        "engine_summary": engine_summary(plan),
        "sbatch_options": sbatch,
        "setup": list(d.setup),
        "check_key_env": key_env is not None,
        "unset_key_env": key_env_to_unset(plan),
        "key_env": key_env,
        "env": extra_env(plan),
        "master_addr_command": d.master_addr_command,
        "check_model_dir": plan.host_model_path is not None,
        "model_dir": plan.host_model_path or "",
        "model_dir_missing": _weights_message(plan),
        "api_port": plan.cfg.server.port,
        "nnodes": plan.nnodes,
        "python": python,
        "python_missing": _on_this_node(f"gantry: deploy.python: {python} on ",
                                        " cannot import torch and gantry's engine; set deploy.python to an interpreter"
                                        " every node has (a venv's bin/python on the shared home), or deploy.setup lines"
                                        " that activate one"),
        "torchrun": torchrun_lines(plan, ShellExpr('"$JOB_DIR/engine.yaml"'), node_rank=ShellExpr('"$SLURM_NODEID"'),
                                   master_addr=ShellExpr('"$MASTER_ADDR"'), nnodes=ShellExpr('"$SLURM_NNODES"')),
    }


def artefacts(plan: Plan) -> list[Artefact]:
    ctx = context(plan)
    return [Artefact("slurm/job.sbatch.j2", "job.sbatch", ctx, executable=True),
            Artefact("slurm/node.sh.j2", "node.sh", ctx, executable=True)]


def submit(plan: Plan) -> int:
    """sbatch job.sbatch from the job directory; print the job id and its log files."""
    key_env = key_env_check(plan)
    if key_env and not os.environ.get(key_env):
        log.error("server.api_key_env: %s is not set; the job would stop at once (export it, or server=noauth)", key_env)
        return 2
    if shutil.which("sbatch") is None:
        log.error("sbatch not found; submit by hand: cd %s && sbatch job.sbatch", plan.job_dir)
        return 1
    done = subprocess.run(["sbatch", "--parsable", "job.sbatch"], cwd=plan.job_dir,
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
