"""deploy=docker: one `docker run` script per node (run.sh, or run-node<N>.sh with --network host).

The container runs `python -m launcher.torchrun ... -m engine.serve --config` with the
job's engine.yaml mounted; the API key reaches it as GANTRY_API_KEY or a mounted file.
"""
from __future__ import annotations

import logging
import os
import shlex
import subprocess
from typing import Any

from launcher.host import BUILD_COMMAND, local_image
from launcher.plan import (CONTAINER_CONFIG, CONTAINER_KEY_ENV, CONTAINER_KEY_FILE, Plan, generation_config_mount,
                           lora_mounts)
from launcher.render import Artefact
from launcher.schema import DockerDeploy
from launcher.targets._common import engine_summary, extra_env, key_env_check, summary, torchrun_lines
from launcher.weights import weights_fix, weights_key

log = logging.getLogger(__name__)


def _deploy(plan: Plan) -> DockerDeploy:
    assert isinstance(plan.cfg.deploy, DockerDeploy)
    return plan.cfg.deploy


def script_name(plan: Plan, node_rank: int) -> str:
    return f"run-node{node_rank}.sh" if plan.multi_node else "run.sh"


def _health_cmd(python: str, port: int) -> str:
    """GET /ready with the image's python (no curl needed); non-zero exit on any error."""
    code = "import sys, urllib.request as r; r.urlopen(sys.argv[1], timeout=5)"
    return f"{shlex.quote(python)} -c '{code}' http://127.0.0.1:{port}/ready"


def _start_message(plan: Plan, node_rank: int, container: str) -> str:
    d, port = _deploy(plan), plan.cfg.server.port
    logs = f"logs: docker logs -f {container}"
    if node_rank:
        return f"gantry: node {node_rank} of {plan.nnodes} joins {d.master_addr} ({logs})"
    if plan.multi_node:
        url = f"http://{d.master_addr}:{port}/v1"
    else:
        url = f"http://localhost:{port if d.network_host else d.host_port}/v1"
    return f"gantry: API on {url} once GET /ready answers 200 ({logs})"


def node_context(plan: Plan, node_rank: int) -> dict[str, Any]:
    """The script of one node; node 0 serves the API."""
    d, server = _deploy(plan), plan.cfg.server
    name = d.container_name or plan.name
    if plan.multi_node:
        name = f"{name}-node{node_rank}"
    env: list[tuple[str, str]] = []
    if plan.use_gpus:
        visible = d.cuda_visible_devices or ",".join(str(i) for i in range(plan.nproc_per_node))
        env.append(("CUDA_VISIBLE_DEVICES", visible))
        if d.torch_cuda_arch_list:
            env.append(("TORCH_CUDA_ARCH_LIST", d.torch_cuda_arch_list))
    env += extra_env(plan)
    volumes = list(d.volumes)
    if plan.host_model_path is not None:
        volumes.insert(0, f"{plan.host_model_path}:{plan.engine['model']}:ro")
    volumes += [f"{host}:{mount}:ro" for host, mount in lora_mounts(plan.cfg).values()]  # LoRA adapters
    generation_config = generation_config_mount(plan.cfg)
    if generation_config:
        volumes.append(f"{generation_config[0]}:{generation_config[1]}:ro")
    if plan.api_key_source == "file":
        volumes.append(f"{os.path.abspath(os.path.expanduser(server.api_key_file or ''))}:{CONTAINER_KEY_FILE}:ro")
    key_env = key_env_check(plan)
    is_api_node = node_rank == 0
    build = BUILD_COMMAND.format(image=d.image)
    return {
        "model_dir": plan.host_model_path or "",
        "check_model_dir": plan.host_model_path is not None,
        "model_dir_missing": f"gantry: {weights_key(plan.cfg)}: {plan.host_model_path} does not exist on this host;"
                             f" {weights_fix(plan.cfg)}",
        "check_image": local_image(d.image) and d.pull != "always",  # a registry's image is pulled instead
        "image_missing": f"gantry: deploy.image: {d.image} is not on this host; build it from the repository root:"
                         f" {build}" + (" (or push it to a registry and set deploy.image=REGISTRY/IMAGE)"
                                        if plan.multi_node else ""),
        "summary": summary(plan),
        "engine_summary": engine_summary(plan),
        "node_rank": node_rank,
        "nnodes": plan.nnodes,
        "container_name": name,
        "image": d.image,
        "pull": d.pull,
        "python": d.python,
        "detach": d.detach,
        "restart": d.restart,
        "gpus": plan.use_gpus,
        "env": env,
        "pass_key_env": plan.api_key_source == "env",
        "container_key_env": CONTAINER_KEY_ENV,
        "check_key_env": key_env is not None,
        "key_env": key_env,
        "copy_key_env": key_env is not None and key_env != CONTAINER_KEY_ENV,
        "volumes": volumes,
        "config_mount": CONTAINER_CONFIG,
        "network_host": d.network_host or plan.multi_node,
        "publish": not (d.network_host or plan.multi_node),
        "host_port": d.host_port,
        "port": server.port,
        "ipc_host": d.ipc_host,
        "shm_size": d.shm_size,
        "stop_timeout_s": int(server.shutdown_grace_s) + 30,
        "health_check": is_api_node,
        "health_cmd": _health_cmd(d.python, server.port),
        "health_interval": f"{d.health_interval_s}s",
        "health_start_period": f"{d.health_start_period_s}s",
        "start_message": _start_message(plan, node_rank, name),
        "torchrun": torchrun_lines(plan, CONTAINER_CONFIG, node_rank=str(node_rank), master_addr=d.master_addr)
        + [seed_flags(plan)],
    }


def seed_flags(plan: Plan) -> list[str]:
    """The seed's vLLM flags (engine.serve accepts them), equal to engine.yaml's values: the
    command reads like the seed's; the API key is never among them."""
    e = plan.engine
    flags = ["--model", e["model"]] if e["model"] else []
    flags += ["--tensor-parallel-size", str(e["tensor_parallel_size"])]
    if e["pipeline_parallel_size"] > 1:
        flags += ["--pipeline-parallel-size", str(e["pipeline_parallel_size"])]
    flags += ["--dtype", e["dtype"]]
    if e["max_model_len"] is not None:
        flags += ["--max-model-len", str(e["max_model_len"])]
    return flags


def context(plan: Plan) -> dict[str, Any]:
    """Node 0's script (the only one for a single node)."""
    return node_context(plan, 0)


def artefacts(plan: Plan) -> list[Artefact]:
    return [Artefact("docker/run.sh.j2", script_name(plan, rank), node_context(plan, rank), executable=True)
            for rank in range(plan.nnodes)]


def submit(plan: Plan) -> int:
    """Run node 0's script here; other nodes' scripts must be run on those machines."""
    for rank in range(1, plan.nnodes):
        log.info("run %s on node %d", plan.job_dir / script_name(plan, rank), rank)
    script = plan.job_dir / script_name(plan, 0)
    log.info("running %s", script)
    return subprocess.run(["bash", str(script)], check=False).returncode
