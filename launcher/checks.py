"""Cross-field checks of a composed config: every user error is a Problem naming the config keys.

validate() collects them all (the model against the parallel layout, the server, the deploy target's
fields, and the single-field checks of launcher.fields and launcher.literals); launcher.plan refuses a
config with any before anything is rendered.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass

from engine.config import DTYPES  # torch-free: engine/__init__ is lazy
from launcher.fields import K8S_QUANTITY, SLURM_MEM, field_problems
from launcher.literals import literal_problems
from launcher.schema import DockerDeploy, GantryConfig, K8sDeploy, LocalDeploy, SlurmDeploy
from launcher.weights import ModelFacts, missing_weights, model_facts, model_kind

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
SIZE = re.compile(r"[0-9]+(\.[0-9]+)?[a-zA-Z]*")
SLURM_TIME = re.compile(r"([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}|infinite|UNLIMITED")
MAX_NAME_LEN = 40  # leaves room for "-headless", pod ordinals and StatefulSet revision labels
WILDCARD_HOSTS = ("0.0.0.0", "::")  # server.host values a published port, a Service or a probe can reach
KEY_ENV = "GANTRY_API_KEY"  # the engine's default key variable, and the key's variable in containers and pods
INT32_MAX = 2**31 - 1  # Kubernetes' integer fields (probe thresholds, seconds)
GPU_LIST = re.compile(r"([A-Za-z0-9/-]+(,[A-Za-z0-9/-]+)*)?")  # CUDA_VISIBLE_DEVICES: indices, GPU-/MIG- UUIDs; "": none


@dataclass(frozen=True)
class Problem:
    keys: tuple[str, ...]  # config keys at fault, as the user writes them on the command line
    message: str  # what is wrong and how to fix it

    def __str__(self) -> str:
        return f"{', '.join(self.keys)}: {self.message}"


def dns_name(job_name: str) -> str:
    """job_name lower-cased, runs of other characters turned into '-', cut to MAX_NAME_LEN."""
    return re.sub(r"[^a-z0-9]+", "-", job_name.lower()).strip("-")[:MAX_NAME_LEN].strip("-")


def _model_facts(cfg: GantryConfig) -> tuple[ModelFacts, list[Problem]]:
    """The model's head and layer counts; one below 1 is a Problem and unknown to the other checks."""
    facts = model_facts(cfg)
    bad = {f.name: getattr(facts, f.name) for f in dataclasses.fields(facts)
           if getattr(facts, f.name) is not None and getattr(facts, f.name) < 1}
    problems = [Problem((f"model.{name}",), f"must be >= 1, got {value} (from the model's yaml, its config.json or"
                                            " model.hf_overrides)") for name, value in bad.items()]
    return dataclasses.replace(facts, **{name: None for name in bad}), problems


def _env_taken(cfg: GantryConfig) -> list[Problem]:
    """deploy.env names the job sets itself: the API key's variable (a value there is written in plain text
    and hid the Secret's in a pod), and the GPU variables deploy=docker sets from its own fields."""
    d, out = cfg.deploy, []
    for name in sorted({KEY_ENV, cfg.server.api_key_env or KEY_ENV} & set(map(str, d.env))):
        out.append(Problem((f"deploy.env.{name}",), "the API key's variable: give the key through server.api_key_env,"
                                                   " server.api_key_file or server.api_key (deploy.env is written in"
                                                   " the job files in plain text)"))
    if isinstance(d, DockerDeploy):
        for name, key in (("CUDA_VISIBLE_DEVICES", "cuda_visible_devices"), ("TORCH_CUDA_ARCH_LIST", "torch_cuda_arch_list")):
            if name in d.env:
                out.append(Problem((f"deploy.env.{name}",), f"set by the job from deploy.{key}; use that instead"))
    return out


def _gpu_list(devices: str | None) -> list[Problem]:
    """deploy.cuda_visible_devices: indices or UUIDs, comma-separated (CUDA stops reading at a blank)."""
    if devices is None or GPU_LIST.fullmatch(devices):
        return []
    return [Problem(("deploy.cuda_visible_devices",), f"{devices!r} is not a list of GPUs like 0,1 or GPU-<uuid>,..."
                                                      " (commas only, no blanks)")]


def _check_parallel(cfg: GantryConfig, facts: ModelFacts) -> list[Problem]:
    p, out = cfg.parallel, []
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "nnodes", "gpus_per_node"):
        if getattr(p, key) < 1:
            out.append(Problem((f"parallel.{key}",), f"must be >= 1, got {getattr(p, key)}"))
    if out:
        return out
    tp, pp = p.tensor_parallel_size, p.pipeline_parallel_size
    if tp * pp != p.nnodes * p.gpus_per_node:
        out.append(Problem(
            ("parallel.tensor_parallel_size", "parallel.pipeline_parallel_size", "parallel.nnodes", "parallel.gpus_per_node"),
            f"tp x pp = {tp} x {pp} = {tp * pp} ranks, but nnodes x gpus_per_node = {p.nnodes} x {p.gpus_per_node}"
            f" = {p.nnodes * p.gpus_per_node} GPUs; they must be equal"))
    heads, kv = facts.num_attention_heads, facts.num_key_value_heads
    if heads is not None and heads % tp:
        out.append(Problem(("parallel.tensor_parallel_size", "model.num_attention_heads"),
                           f"tensor parallel size {tp} must divide the {heads} attention heads of {cfg.model.name}"))
    if kv is not None and (kv % tp if tp <= kv else tp % kv):
        out.append(Problem(("parallel.tensor_parallel_size", "model.num_key_value_heads"),
                           f"tensor parallel size {tp} and the {kv} KV heads of {cfg.model.name}: one must divide"
                           " the other (KV heads are split, or replicated when tp > KV heads)"))
    layers = facts.num_hidden_layers
    if layers is not None and pp > layers:
        out.append(Problem(("parallel.pipeline_parallel_size", "model.num_hidden_layers"),
                           f"pipeline parallel size {pp} exceeds the {layers} layers of {cfg.model.name}"))
    if not 1 <= p.master_port <= 65535:
        out.append(Problem(("parallel.master_port",), f"must be in 1..65535, got {p.master_port}"))
    elif p.master_port == cfg.server.port:
        out.append(Problem(("parallel.master_port", "server.port"), f"both are {p.master_port}; node 0 needs two ports"))
    return out


def _check_model(cfg: GantryConfig, facts: ModelFacts) -> list[Problem]:
    m, out = cfg.model, []
    if m.dtype not in DTYPES:
        out.append(Problem(("model.dtype",), f"must be one of {', '.join(DTYPES[:4])}, got {m.dtype!r}"))
    limit = facts.max_position_embeddings
    if m.max_model_len is not None and limit is not None and m.max_model_len > limit:
        out.append(Problem(("model.max_model_len", "model.max_position_embeddings"),
                           f"{m.max_model_len} exceeds the {limit} positions {m.name} was trained for"))
    return out


def _check_server(cfg: GantryConfig) -> list[Problem]:
    s, out = cfg.server, []
    if not 1 <= s.port <= 65535:
        out.append(Problem(("server.port",), f"must be in 1..65535, got {s.port}"))
    if s.api_key is not None and not s.api_key:
        out.append(Problem(("server.api_key",), "is empty; use null for no literal key"))
    if s.api_key_env is not None and not ENV_NAME.fullmatch(s.api_key_env):
        out.append(Problem(("server.api_key_env",), f"{s.api_key_env!r} is not an environment variable name"))
    return out


def _check_local(cfg: GantryConfig, d: LocalDeploy) -> list[Problem]:
    out = []
    if cfg.parallel.nnodes > 1:
        if d.node_rank is None or d.master_addr is None:
            out.append(Problem(("parallel.nnodes", "deploy.node_rank", "deploy.master_addr"),
                               f"deploy=local runs one node; for {cfg.parallel.nnodes} nodes set deploy.node_rank and"
                               " deploy.master_addr on each machine, or use deploy=slurm, docker or k8s"))
        elif not 0 <= d.node_rank < cfg.parallel.nnodes:
            out.append(Problem(("deploy.node_rank",), f"must be in 0..{cfg.parallel.nnodes - 1}, got {d.node_rank}"))
    missing = missing_weights(cfg)  # deploy=local runs here: the weights must be here
    if missing:
        out.append(Problem((missing[0],), missing[1]))
    out += _gpu_list(d.cuda_visible_devices)
    if not 0 < d.stop_timeout_s < math.inf:  # nan too
        out.append(Problem(("deploy.stop_timeout_s",), f"must be a number of seconds > 0, got {d.stop_timeout_s}"))
    return out


def _check_docker(cfg: GantryConfig, d: DockerDeploy) -> list[Problem]:
    out = _check_container(d.image, d.model_mount, cfg)
    if d.pull not in ("missing", "never", "always"):
        out.append(Problem(("deploy.pull",), f"must be missing, never or always, got {d.pull!r}"))
    if not re.fullmatch(r"no|always|unless-stopped|on-failure(:[0-9]+)?", d.restart):
        out.append(Problem(("deploy.restart",), f"must be no, on-failure[:N], always or unless-stopped, got {d.restart!r}"))
    if not 1 <= d.host_port <= 65535:
        out.append(Problem(("deploy.host_port",), f"must be in 1..65535, got {d.host_port}"))
    if not SIZE.fullmatch(d.shm_size):
        out.append(Problem(("deploy.shm_size",), f"must be a size like 64g, got {d.shm_size!r}"))
    host = cfg.server.host
    if not (d.network_host or cfg.parallel.nnodes > 1) and host not in WILDCARD_HOSTS:
        out.append(Problem(("server.host", "deploy.network_host"),
                           f"{host} inside the container is unreachable through the published port (-p {d.host_port}:"
                           f"{cfg.server.port}); use 0.0.0.0, or deploy.network_host=true to listen on the host's {host}"))
    if cfg.parallel.nnodes > 1 and not d.master_addr:
        out.append(Problem(("deploy.master_addr", "parallel.nnodes"),
                           f"{cfg.parallel.nnodes} nodes: set deploy.master_addr to node 0's address"))
    out += _gpu_list(d.cuda_visible_devices)
    if d.cuda_visible_devices is not None and len(d.cuda_visible_devices.split(",")) != cfg.parallel.gpus_per_node:
        out.append(Problem(("deploy.cuda_visible_devices", "parallel.gpus_per_node"),
                           f"{d.cuda_visible_devices!r} lists a different number of GPUs than {cfg.parallel.gpus_per_node}"))
    if d.container_name is not None and not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", d.container_name):
        out.append(Problem(("deploy.container_name",), f"{d.container_name!r} is not a valid container name"))
    return out


def _check_slurm(cfg: GantryConfig, d: SlurmDeploy) -> list[Problem]:
    out = []
    if d.cpus_per_task < 1:
        out.append(Problem(("deploy.cpus_per_task",), f"must be >= 1, got {d.cpus_per_task}"))
    if not SLURM_TIME.fullmatch(d.time):
        out.append(Problem(("deploy.time",), f"must be a Slurm time like 24:00:00 or 1-00:00:00, got {d.time!r}"))
    if not SLURM_MEM.fullmatch(d.mem):
        out.append(Problem(("deploy.mem",), f"must be a size like 64G or 500M (0: all), got {d.mem!r}"))
    if d.python == "":
        out.append(Problem(("deploy.python",), "is empty; name the interpreter on the nodes, or null for the default"))
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(d, key) == "":
            out.append(Problem((f"deploy.{key}",), "is empty; use null to omit it"))
    return out


def _check_k8s(cfg: GantryConfig, d: K8sDeploy) -> list[Problem]:
    out = _check_container(d.image, d.model_mount, cfg)
    kind = model_kind(cfg.model.path)
    if not DNS_LABEL.fullmatch(d.namespace) or len(d.namespace) > 63:
        out.append(Problem(("deploy.namespace",), f"{d.namespace!r} is not a DNS label (at most 63 lower-case letters,"
                                                  " digits and '-')"))
    name = dns_name(cfg.job_name)
    if name[:1].isdigit():  # a Service's name is a DNS-1035 label
        out.append(Problem(("job_name",), f"{name!r} names the Services, which must start with a letter;"
                                          f" e.g. job_name=gantry-{name}"))
    if d.storage.kind not in ("hostPath", "pvc", "none"):
        out.append(Problem(("deploy.storage.kind",), f"must be hostPath, pvc or none, got {d.storage.kind!r}"))
    elif d.storage.kind == "pvc" and not d.storage.pvc_name:
        out.append(Problem(("deploy.storage.pvc_name", "deploy.storage.kind"), "storage.kind=pvc needs the claim's name"))
    elif d.storage.kind == "none" and kind != "embedded":
        out.append(Problem(("deploy.storage.kind", "model.path"),
                           f"the pods need {cfg.model.path}'s weights: use hostPath or pvc"))
    if d.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
        out.append(Problem(("deploy.image_pull_policy",), f"must be Always, IfNotPresent or Never, got {d.image_pull_policy!r}"))
    if d.service_type not in ("ClusterIP", "NodePort", "LoadBalancer"):
        out.append(Problem(("deploy.service_type",), f"must be ClusterIP, NodePort or LoadBalancer, got {d.service_type!r}"))
    if not K8S_QUANTITY.fullmatch(d.shm_size):
        out.append(Problem(("deploy.shm_size",), f"must be a quantity like 64Gi, got {d.shm_size!r}"))
    if not 10 <= d.startup_timeout_s <= INT32_MAX:
        out.append(Problem(("deploy.startup_timeout_s",), f"must be in 10..{INT32_MAX}, got {d.startup_timeout_s}"))
    if cfg.server.host not in WILDCARD_HOSTS:
        out.append(Problem(("server.host",), f"{cfg.server.host} is not reachable from the Service and the kubelet's probes"
                                             " (they connect to the pod's IP); use 0.0.0.0 or ::"))
    if not DNS_LABEL.fullmatch(cfg.server.api_key_secret):
        out.append(Problem(("server.api_key_secret",), f"{cfg.server.api_key_secret!r} is not a valid Secret name"))
    return out


def _check_container(image: str, model_mount: str, cfg: GantryConfig) -> list[Problem]:
    out = []
    if not image.strip():
        out.append(Problem(("deploy.image",), "is empty: name the image built from docker/Dockerfile (e.g. gantry:latest)"))
    if not model_mount.startswith("/"):
        out.append(Problem(("deploy.model_mount",), f"must be an absolute path, got {model_mount!r}"))
    tokenizer = cfg.model.tokenizer
    if tokenizer is not None and (tokenizer.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(tokenizer))):
        out.append(Problem(("model.tokenizer",), "a host path is not visible in the container: keep the tokenizer"
                           " files in the model directory and set model.tokenizer=null"))
    return out


_TARGET_CHECKS = {LocalDeploy: _check_local, DockerDeploy: _check_docker, SlurmDeploy: _check_slurm, K8sDeploy: _check_k8s}


def validate(cfg: GantryConfig, reserved_mounts: tuple[str, ...]) -> list[Problem]:
    """Every problem of the config (empty: deployable); reserved_mounts: directories a container of the
    job mounts its own files at (launcher.plan.RESERVED_MOUNTS)."""
    facts, problems = _model_facts(cfg)
    problems += _check_model(cfg, facts) + _check_parallel(cfg, facts) + _check_server(cfg)
    bad_env = [name for name in cfg.deploy.env if not ENV_NAME.fullmatch(str(name))]
    if bad_env:
        problems.append(Problem(("deploy.env",), f"{bad_env[0]!r} is not an environment variable name"))
    problems += _env_taken(cfg)
    if cfg.engine.device not in ("auto", "cuda", "cpu"):
        problems.append(Problem(("engine.device",), f"must be auto, cuda or cpu, got {cfg.engine.device!r}"))
    check = _TARGET_CHECKS.get(type(cfg.deploy))
    if check is None:
        problems.append(Problem(("deploy",), f"unknown target {cfg.deploy.target!r}: local, docker, slurm or k8s"))
    else:
        problems += check(cfg, cfg.deploy)
    if not dns_name(cfg.job_name):
        problems.append(Problem(("job_name",), f"{cfg.job_name!r} has no letters or digits"))
    found = literal_problems(cfg) + field_problems(cfg, reserved_mounts)
    return problems + [Problem((key,), message) for key, message in found]
