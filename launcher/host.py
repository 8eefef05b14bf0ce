"""Checks against the machine that renders: are the weights and LoRA adapters here, is there a GPU
per rank, does the cluster need a Secret or a pushed image. Rendering only warns (the job may run elsewhere);
submit=true refuses what cannot start, with one line naming the key and the command that fixes it.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

from launcher.fields import missing_dirs
from launcher.checks import Problem
from launcher.plan import DEFAULT_KEY_ENV, Plan, keyless_local
from launcher.schema import K8sDeploy, LocalDeploy, SlurmDeploy
from launcher.weights import missing_weights

GPU_PROBE = "import torch; print(torch.cuda.device_count())"
GPU_PROBE_TIMEOUT_S = 120.0
BUILD_COMMAND = "docker build -f docker/Dockerfile -t {image} ."  # run from the repository root


def local_image(image: str) -> bool:
    """An image name without a registry or namespace (gantry:latest) is built, never pulled."""
    return "/" not in image.split("@", 1)[0]


def _weights_where(plan: Plan) -> str:
    """Where the weights must be, for the missing-weights line of each target."""
    d = plan.cfg.deploy
    if isinstance(d, SlurmDeploy):
        return " (run it on a login node, into a directory every compute node sees)"
    if isinstance(d, K8sDeploy):
        return " (hostPath: on every node that may run a pod; or use deploy.storage.kind=pvc)"
    if plan.multi_node:
        return " (on every node)"
    return ""


def _missing_files(plan: Plan) -> list[Problem]:
    """Weights, LoRA adapters and a generation config (host paths the ranks mount or read) missing on this machine."""
    d = plan.cfg.deploy
    if isinstance(d, LocalDeploy):
        return []  # already config errors
    weights = None if isinstance(d, K8sDeploy) and d.storage.kind != "hostPath" else missing_weights(plan.cfg)
    out = [Problem((weights[0],), weights[1] + _weights_where(plan))] if weights else []
    # adapters and a generation config are always host paths (docker -v, k8s hostPath, the Slurm nodes' shared
    # file system)
    return out + [Problem((key,), message) for key, message in missing_dirs(plan.cfg)]


def render_notes(plan: Plan) -> list[str]:
    """One line each: what this render needs before it can start (printed, never fatal)."""
    d, server, notes = plan.cfg.deploy, plan.cfg.server, []
    notes += [f"warning: {missing}" for missing in _missing_files(plan)]
    if isinstance(d, LocalDeploy) and keyless_local(plan.cfg):
        notes.append(f"warning: server.api_key_env: {server.api_key_env} is not set: no API key, so the API listens"
                     f" on {plan.server['host']} only (export {server.api_key_env} to require a key and listen on"
                     f" {server.host}, or server=noauth to serve anyone without one)")
    if isinstance(d, K8sDeploy):
        if plan.api_key_source in ("env", "file"):
            notes.append(f"the pods read the API key from Secret {server.api_key_secret} (key {server.api_key_secret_key}),"
                         f" which must exist first: {secret_command(plan)}")
        if local_image(d.image) and d.image_pull_policy != "Never":
            notes.append(f"warning: deploy.image: {d.image} names no registry, so every node must already have it;"
                         f" build and push it ({BUILD_COMMAND.format(image='REGISTRY/' + d.image)} && docker push"
                         f" REGISTRY/{d.image}) and set deploy.image=REGISTRY/{d.image}")
    return notes


def secret_command(plan: Plan) -> str:
    """kubectl's command creating the key's Secret from where the key is: server.api_key_file, or the variable
    server.api_key_env ($GANTRY_API_KEY for a literal key); the value never appears."""
    d, s = plan.cfg.deploy, plan.cfg.server
    assert isinstance(d, K8sDeploy)
    if plan.api_key_source == "file":  # $(cat) drops the file's last newline, as the engine's read of the file does
        path = shlex.quote(os.path.abspath(os.path.expanduser(s.api_key_file or "")))
        source = f"--from-literal={s.api_key_secret_key}=\"$(cat {path})\""
    else:
        env = s.api_key_env if plan.api_key_source == "env" and s.api_key_env else DEFAULT_KEY_ENV
        source = f"--from-literal={s.api_key_secret_key}=\"${env}\""
    return f"kubectl -n {d.namespace} create secret generic {s.api_key_secret} {source}"


def submit_problems(plan: Plan) -> list[Problem]:
    """Why submit=true must not run or submit this job here (empty: go)."""
    problems = _missing_files(plan)
    if isinstance(plan.cfg.deploy, LocalDeploy):
        gpus = _gpu_problem(plan, plan.cfg.deploy)
        if gpus:
            problems.append(gpus)
    return problems


def visible_gpus(python: str, cuda_visible_devices: str | None) -> int | None:
    """GPUs torch sees under `python` (the ranks' interpreter); None when it cannot tell."""
    env = dict(os.environ)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    try:
        done = subprocess.run([python, "-c", GPU_PROBE], env=env, capture_output=True, text=True,
                              timeout=GPU_PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.split()
    return int(lines[-1]) if done.returncode == 0 and lines and lines[-1].isdigit() else None


def _gpu_problem(plan: Plan, d: LocalDeploy) -> Problem | None:
    """deploy=local runs here: each rank of a GPU run needs a GPU of this machine."""
    device, need = plan.cfg.engine.device, plan.nproc_per_node
    if device == "cpu" or (device == "auto" and need == 1):
        return None  # one process with device=auto falls back to the CPU by itself
    have = visible_gpus(d.python or sys.executable, d.cuda_visible_devices)
    if have is None or have >= need:
        return None
    ranks = f"{need} ranks need {need} GPUs" if need > 1 else "engine.device=cuda needs a GPU"
    if have == 0:
        return Problem(("parallel.gpus_per_node", "engine.device"),
                       f"{ranks}, but this machine has none visible; add engine=cpu to run"
                       f" {'them as CPU processes' if need > 1 else 'on the CPU'}")
    return Problem(("parallel.gpus_per_node", "engine.device"),
                   f"{ranks}, but this machine has {have} visible; pick a layout of at most {have} ranks"
                   " (parallel=tp1, tp2, ...) or deploy on a bigger machine")
