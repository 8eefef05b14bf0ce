"""deploy=k8s: manifests under k8s/ in the job directory; submit() runs kubectl apply.

One node: Deployment + Service. Several: StatefulSet (pod ordinal = node rank, pods start in
parallel) + headless Service naming pod 0 as the rendezvous, and a Service to pod 0's API.
engine.yaml travels in a ConfigMap; the API key comes from a Secret.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Any

from launcher.host import secret_command
from launcher.plan import CONTAINER_CONFIG, CONTAINER_KEY_ENV, Plan, generation_config_mount, lora_mounts
from launcher.render import Artefact, ShellExpr
from launcher.schema import K8sDeploy
from launcher.targets._common import engine_summary, extra_env, flat, summary, torchrun_lines

PROBE_PERIOD_S = 10  # seconds between probes
# A StatefulSet pod's hostname is <name>-<ordinal>: the ordinal is the node rank on every Kubernetes
# version (the apps.kubernetes.io/pod-index label needs >= 1.28).
RANK_FROM_HOSTNAME = 'NODE_RANK="${HOSTNAME:-$(cat /proc/sys/kernel/hostname)}"; NODE_RANK="${NODE_RANK##*-}"; '


def literal(text: str) -> str:
    """text as Kubernetes leaves it: it expands $(NAME) in env values, command and args, and reads $$ as $."""
    return text.replace("$", "$$")


def _deploy(plan: Plan) -> K8sDeploy:
    assert isinstance(plan.cfg.deploy, K8sDeploy)
    return plan.cfg.deploy


def _probe_exec(python: str, port: int, path: str) -> list[str]:
    """Multi-node pods share one template but only pod 0 (hostname <name>-0) serves HTTP: others pass."""
    code = (f"import socket, urllib.request; socket.gethostname().rsplit('-', 1)[-1] != '0' or "
            f"urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)")
    return [python, "-c", code]


def _sh_word(word: str) -> str:
    """One word of the pods' sh -c line: single quotes (a '$' escaped with a backslash would hide Kubernetes'
    $$ from it), around the literal text."""
    return str(word) if isinstance(word, ShellExpr) else shlex.quote(literal(word))


def _command(plan: Plan, python: str, master: str) -> list[str]:
    """The container's argv: torchrun; several pods go through sh to take the rank from the hostname."""
    if not plan.multi_node:
        return [literal(python)] + flat(torchrun_lines(plan, CONTAINER_CONFIG))
    argv = [python] + flat(torchrun_lines(plan, CONTAINER_CONFIG, node_rank=ShellExpr('"$NODE_RANK"'), master_addr=master))
    return ["/bin/sh", "-c", RANK_FROM_HOSTNAME + "exec " + " ".join(_sh_word(word) for word in argv)]


def _host_dir_volumes(plan: Plan) -> list[dict[str, str]]:
    """Directories of the node mounted read-only (hostPath): LoRA adapters, model.generation_config."""
    out = [{"name": f"lora-{i}", "host_path": host, "mount": mount}
           for i, (host, mount) in enumerate(lora_mounts(plan.cfg).values())]
    generation_config = generation_config_mount(plan.cfg)
    if generation_config:
        out.append({"name": "generation-config", "host_path": generation_config[0], "mount": generation_config[1]})
    return out


def context(plan: Plan) -> dict[str, Any]:
    d, server = _deploy(plan), plan.cfg.server
    name, ns = plan.name, d.namespace
    headless = f"{name}-headless"
    master = f"{name}-0.{headless}.{ns}.svc"
    storage = "none" if plan.model_kind == "embedded" else d.storage.kind  # the embedded model is in the image
    model_path = plan.engine["model"] or d.model_mount
    is_file = bool(plan.cfg.model.path and plan.cfg.model.path.endswith(".gguf"))
    auth = plan.api_key_source != "none"
    grace = int(server.shutdown_grace_s) + 30
    return {
        "summary": summary(plan),
        "engine_summary": engine_summary(plan),
        "name": name,
        "namespace": ns,
        "multi_node": plan.multi_node,
        "replicas": plan.nnodes,
        "headless_name": headless,
        "api_service_name": name,
        "config_map_name": f"{name}-config",
        "engine_yaml": plan.engine_yaml(),
        "image": d.image,
        "image_pull_policy": d.image_pull_policy,
        "command": _command(plan, d.python, master),
        "config_mount_dir": CONTAINER_CONFIG.rsplit("/", 1)[0],
        "env": [(name, literal(value)) for name, value in extra_env(plan)],
        "auth": auth,
        "key_env": CONTAINER_KEY_ENV,
        "secret_name": server.api_key_secret,
        "secret_key": server.api_key_secret_key,
        "render_secret": plan.api_key_source == "literal",
        "secret_value": server.api_key or "",
        "secret_command": secret_command(plan),
        "secret_needed": auth and plan.api_key_source != "literal",  # made by the user, not rendered
        "port": server.port,
        "master_port": plan.cfg.parallel.master_port,
        "gpus": plan.use_gpus,
        "gpus_per_node": plan.nproc_per_node,
        "cpu": d.cpu,
        "memory": d.memory,
        "shm_size": d.shm_size,
        "storage_host_path": storage == "hostPath",
        "storage_pvc": storage == "pvc",
        "storage_none": storage == "none",
        "host_path": plan.host_model_path or "",
        "host_path_type": "File" if is_file else "Directory",
        "pvc_name": d.storage.pvc_name or "",
        "pvc_sub_path": d.storage.sub_path,
        "has_sub_path": bool(d.storage.sub_path),
        "model_mount": model_path,
        "model_read_only": d.storage.read_only,
        "host_dir_volumes": _host_dir_volumes(plan),
        "startup_failure_threshold": max(1, -(-d.startup_timeout_s // PROBE_PERIOD_S)),
        "probe_period_s": PROBE_PERIOD_S,
        "ready_exec": _probe_exec(d.python, server.port, "/ready"),
        "health_exec": _probe_exec(d.python, server.port, "/health"),
        "termination_grace_s": grace,
        "service_type": d.service_type,
        "service_monitor": d.service_monitor,
        "service_monitor_labels": dict(d.service_monitor_labels),
        "metrics_auth": auth and server.metrics_require_key,
        "node_selector": dict(d.node_selector),
        "has_node_selector": bool(d.node_selector),
        "tolerations": [dict(t) for t in d.tolerations],
        "has_tolerations": bool(d.tolerations),
        "runtime_class_name": d.runtime_class_name or "",
        "has_runtime_class": bool(d.runtime_class_name),
    }


def artefacts(plan: Plan) -> list[Artefact]:
    ctx = context(plan)
    files = [("k8s/configmap.yaml.j2", "k8s/configmap.yaml")]
    if ctx["render_secret"]:
        files.append(("k8s/secret.yaml.j2", "k8s/secret.yaml"))
    if plan.multi_node:
        files += [("k8s/headless-service.yaml.j2", "k8s/headless-service.yaml"),
                  ("k8s/statefulset.yaml.j2", "k8s/statefulset.yaml")]
    else:
        files.append(("k8s/deployment.yaml.j2", "k8s/deployment.yaml"))
    files.append(("k8s/service.yaml.j2", "k8s/service.yaml"))
    if ctx["service_monitor"]:
        files.append(("k8s/servicemonitor.yaml.j2", "k8s/servicemonitor.yaml"))
    return [Artefact(template, path, ctx, private=path == "k8s/secret.yaml") for template, path in files]


def apply_command(plan: Plan) -> list[str]:
    return ["kubectl", "apply", "-f", str(plan.job_dir / "k8s")]


def submit(plan: Plan) -> int:
    """kubectl apply when kubectl exists, else print the command (the Secret's command is printed at render)."""
    argv = apply_command(plan)
    if shutil.which("kubectl") is None:
        print(f"kubectl not found; apply with: {shlex.join(argv)}")
        return 0
    return subprocess.run(argv, check=False).returncode
