"""Checks of single launcher fields the engine's own config never sees: formats the target's tool
parses (Kubernetes quantities, labels, object names and tolerations, Slurm memory, Docker health
intervals, host names, a module name), empty strings that would silently mean something else (""
as model.path is the current directory), a job_name whose '..' leads the job directory out of
output_dir, container mounts that collide with the job's own, and the directories of the adapters
and of model.generation_config. Each
bad value is reported as (key, message)."""
from __future__ import annotations

import os
import re

from launcher.literals import CONTROL
from launcher.schema import GENERATION_CONFIG_WORDS, DockerDeploy, GantryConfig, K8sDeploy, LocalDeploy

Found = tuple[str, str]  # (key, message), as launcher.checks.Problem takes them

K8S_QUANTITY = re.compile(r"[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[mkMGTPE]|[eE][+-]?[0-9]+)?")  # resource.Quantity
SLURM_MEM = re.compile(r"[0-9]+[KMGTkmgt]?")  # sbatch --mem (checked by launcher.checks)
MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
LABEL_KEY = re.compile(rf"({_DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?")
HOST = re.compile(r"[A-Za-z0-9_.:%\[\]][-A-Za-z0-9_.:%\[\]]*")  # a host name or an IPv4/IPv6 address
DNS_SUBDOMAIN = re.compile(_DNS_SUBDOMAIN)
TOLERATION_FIELDS = ("key", "operator", "value", "effect", "tolerationSeconds")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def _names(cfg: GantryConfig) -> list[Found]:
    m, out = cfg.model, []
    for key in ("path", "local_dir", "served_model_name", "tokenizer"):
        value = getattr(m, key)
        if value is not None and not value.strip():
            out.append((f"model.{key}", "is empty; use null for the default"))
    addresses = {"server.host": cfg.server.host, "deploy.master_addr": getattr(cfg.deploy, "master_addr", None)}
    out += [(key, f"{value!r} is not a host name or IP address") for key, value in addresses.items()
            if value is not None and not HOST.fullmatch(value)]
    if cfg.server.api_key_file is not None and CONTROL.search(cfg.server.api_key_file):
        out.append(("server.api_key_file", f"{cfg.server.api_key_file!r} holds a control character; move the file"))
    python = getattr(cfg.deploy, "python", None)
    if python is not None and (python.startswith("-") or CONTROL.search(python)):
        out.append(("deploy.python", f"{python!r} is not an interpreter's name or path"))
    if ".." in re.split(r"[/\\]", cfg.job_name):
        out.append(("job_name", f"{cfg.job_name!r} names a directory outside output_dir ({cfg.output_dir}); drop the '..'"))
    if not MODULE.fullmatch(cfg.deploy.module):
        out.append(("deploy.module", f"{cfg.deploy.module!r} is not a Python module name (python -m MODULE)"))
    return out


def _labels(key: str, labels: dict[str, str]) -> list[Found]:
    for name, value in labels.items():
        if not LABEL_KEY.fullmatch(str(name)) or not LABEL_VALUE.fullmatch(str(value)):
            return [(key, f"{name!r}: {value!r} is not a Kubernetes label (name and value: letters, digits, '-', '_',"
                          " '.', at most 63 characters, starting and ending with a letter or digit)")]
    return []


def _check_k8s(d: K8sDeploy) -> list[Found]:
    out = [(f"deploy.{key}", f"{getattr(d, key)!r} is not a Kubernetes quantity like 8, 500m, 64Gi or 64G")
           for key in ("cpu", "memory") if not K8S_QUANTITY.fullmatch(getattr(d, key))]
    out += _labels("deploy.node_selector", dict(d.node_selector))
    if d.service_monitor:
        out += _labels("deploy.service_monitor_labels", dict(d.service_monitor_labels))
    out += [(f"deploy.{key}", f"{value!r} is not a Kubernetes object name (lower-case letters, digits, '-', '.')")
            for key, value in (("storage.pvc_name", d.storage.pvc_name), ("runtime_class_name", d.runtime_class_name))
            if value and not DNS_SUBDOMAIN.fullmatch(value)]
    for i, toleration in enumerate(d.tolerations):
        unknown = sorted(set(toleration) - set(TOLERATION_FIELDS))
        if unknown:
            out.append(("deploy.tolerations", f"entry {i} has {unknown[0]!r}; a toleration has {', '.join(TOLERATION_FIELDS)}"))
    sub = d.storage.sub_path
    if sub and (sub.startswith("/") or ".." in sub.split("/")):
        out.append(("deploy.storage.sub_path", f"{sub!r} must be a relative path inside the claim, without '..'"))
    return out


def _mount_collision(model_mount: str, reserved: tuple[str, ...]) -> list[Found]:
    """The weights' mount point may not hide, or sit inside, a mount of the job's own files."""
    mount = os.path.normpath(model_mount)
    if mount == "/":
        return [("deploy.model_mount", "'/' is the container's root; pick a directory, e.g. /models")]
    for own in reserved:
        if mount == own or own.startswith(mount + "/") or mount.startswith(own + "/"):
            return [("deploy.model_mount", f"{model_mount!r} collides with {own}, where the job mounts its own files;"
                                           " pick another directory, e.g. /models")]
    return []


def missing_dirs(cfg: GantryConfig) -> list[Found]:
    """model.lora_modules directories, and model.generation_config's, that are not on this machine."""
    out = [(f"model.lora_modules.{name}", f"{path} does not exist on this machine; put the adapter's directory"
                                          " there first (adapter_config.json and its weights)")
           for name, path in cfg.model.lora_modules.items() if not os.path.exists(os.path.expanduser(path))]
    generation_config = cfg.model.generation_config
    if generation_config not in GENERATION_CONFIG_WORDS and not os.path.isdir(os.path.expanduser(generation_config)):
        out.append(("model.generation_config", f"{generation_config} is not a directory on this machine; put a"
                    " generation_config.json in one there, or use auto (the model's own) or vllm (none)"))
    return out


def field_problems(cfg: GantryConfig, reserved_mounts: tuple[str, ...]) -> list[Found]:
    """Every single-field problem of cfg (see the module docstring); reserved_mounts: directories
    a container of the job mounts its own files at."""
    d, s, out = cfg.deploy, cfg.server, _names(cfg)
    if s.api_key and s.api_key_file:
        out.append(("server.api_key", "is set together with server.api_key_file; set one of them (the other null)"))
    if isinstance(d, (DockerDeploy, K8sDeploy)):
        out += _mount_collision(d.model_mount, reserved_mounts)
    if isinstance(d, DockerDeploy):
        if d.health_interval_s < 1:
            out.append(("deploy.health_interval_s", f"must be >= 1, got {d.health_interval_s}"))
        if d.health_start_period_s < 0:
            out.append(("deploy.health_start_period_s", f"must be >= 0, got {d.health_start_period_s}"))
    if isinstance(d, K8sDeploy):
        out += _check_k8s(d)
    if isinstance(d, LocalDeploy):
        out += missing_dirs(cfg)  # deploy=local runs here: they must be here
    return out
