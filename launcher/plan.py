"""Cross-field checks and derived values: a composed config becomes a validated Plan.

Every user error is collected as a Problem naming the config keys; build_plan raises
PlanError with all of them before anything is rendered. The Plan also holds the
engine.yaml sections as the ranks of the chosen target will see them.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from engine.config import DTYPES, ConfigError, EngineConfig, ServerConfig  # torch-free: engine/__init__ is lazy
from launcher.fields import K8S_QUANTITY, SLURM_MEM, field_problems
from launcher.keys import unknown_keys
from launcher.literals import literal_problems
from launcher.schema import DockerDeploy, GantryConfig, K8sDeploy, LocalDeploy, SlurmDeploy
from launcher.weights import ModelFacts, host_model_path, missing_weights, model_facts, model_kind

CONTAINER_CONFIG = "/etc/gantry/engine.yaml"  # where docker and k8s mount engine.yaml
CONTAINER_KEY_ENV = "GANTRY_API_KEY"  # the key's variable inside containers and pods
CONTAINER_KEY_FILE = "/run/secrets/gantry-api-key"  # where docker mounts server.api_key_file
DEFAULT_KEY_ENV = "GANTRY_API_KEY"  # server.api_key_env's default: unset on deploy=local means no key
LORA_MOUNT = "/adapters"  # model.lora_modules' directories inside a container: /adapters/<index>
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
SIZE = re.compile(r"[0-9]+(\.[0-9]+)?[a-zA-Z]*")
SLURM_TIME = re.compile(r"([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}|infinite|UNLIMITED")
MAX_NAME_LEN = 40  # leaves room for "-headless", pod ordinals and StatefulSet revision labels

# EngineConfig/ServerConfig field -> the launcher key that sets it (for error messages).
_ENGINE_KEYS = {
    "model": "model.path", "tokenizer": "model.tokenizer", "served_model_name": "model.served_model_name",
    "dtype": "model.dtype", "max_model_len": "model.max_model_len", "load_format": "model.load_format",
    "quantization": "model.quantization",
    "hf_overrides": "model.hf_overrides", "generation_config": "model.generation_config",
    "override_generation_config": "model.override_generation_config", "lora_modules": "model.lora_modules",
    "tensor_parallel_size": "parallel.tensor_parallel_size",
    "pipeline_parallel_size": "parallel.pipeline_parallel_size",
}
# ServerConfig fields a model config sets (the model's output format)
_MODEL_SERVER_KEYS = {"reasoning_parser": "model.reasoning_parser", "tool_call_parser": "model.tool_call_parser"}


@dataclass(frozen=True)
class Problem:
    keys: tuple[str, ...]  # config keys at fault, as the user writes them on the command line
    message: str  # what is wrong and how to fix it

    def __str__(self) -> str:
        return f"{', '.join(self.keys)}: {self.message}"


class PlanError(Exception):
    """The config cannot be deployed; `problems` name the keys."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class Plan:
    cfg: GantryConfig  # the composed config, typed and resolved
    job_dir: Path  # absolute directory the artefacts are written to
    name: str  # job name as a DNS label: containers, pods, Services, the Slurm job
    model_kind: str  # embedded | local | hub
    host_model_path: str | None  # weights on the host or node (local path, or a hub id's local_dir); None: embedded
    engine: dict[str, Any]  # engine.yaml `engine:` section, as the ranks see it
    server: dict[str, Any]  # engine.yaml `server:` section, as the ranks see it
    api_key_source: str  # none | literal | env | file

    @property
    def target(self) -> str:
        return self.cfg.deploy.target

    @property
    def nnodes(self) -> int:
        return self.cfg.parallel.nnodes

    @property
    def nproc_per_node(self) -> int:
        return self.cfg.parallel.gpus_per_node

    @property
    def use_gpus(self) -> bool:
        return self.cfg.engine.device != "cpu"

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    def engine_yaml(self) -> str:
        """engine.yaml as engine.config.load_config_file reads it."""
        return yaml.safe_dump({"engine": self.engine, "server": self.server}, sort_keys=False)


def to_config(cfg: DictConfig | GantryConfig) -> GantryConfig:
    """The typed config object (interpolations resolved)."""
    if isinstance(cfg, GantryConfig):
        return cfg
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, GantryConfig), type(obj)
    return obj


def dns_name(job_name: str) -> str:
    """job_name lower-cased, runs of other characters turned into '-', cut to MAX_NAME_LEN."""
    return re.sub(r"[^a-z0-9]+", "-", job_name.lower()).strip("-")[:MAX_NAME_LEN].strip("-")


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
    if d.stop_timeout_s <= 0:
        out.append(Problem(("deploy.stop_timeout_s",), f"must be > 0, got {d.stop_timeout_s}"))
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
    if cfg.parallel.nnodes > 1 and not d.master_addr:
        out.append(Problem(("deploy.master_addr", "parallel.nnodes"),
                           f"{cfg.parallel.nnodes} nodes: set deploy.master_addr to node 0's address"))
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
    if not DNS_LABEL.fullmatch(d.namespace):
        out.append(Problem(("deploy.namespace",), f"{d.namespace!r} is not a DNS label"))
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
    if d.startup_timeout_s < 10:
        out.append(Problem(("deploy.startup_timeout_s",), f"must be >= 10, got {d.startup_timeout_s}"))
    if not DNS_LABEL.fullmatch(cfg.server.api_key_secret):
        out.append(Problem(("server.api_key_secret",), f"{cfg.server.api_key_secret!r} is not a valid Secret name"))
    return out


def _check_container(image: str, model_mount: str, cfg: GantryConfig) -> list[Problem]:
    out = []
    if not image.strip():
        out.append(Problem(("deploy.image",), "is empty: name the image built from docker/Dockerfile (e.g. gantry:latest)"))
    if not model_mount.startswith("/"):
        out.append(Problem(("deploy.model_mount",), f"must be an absolute path, got {model_mount!r}"))
    if cfg.model.tokenizer is not None and model_kind(cfg.model.tokenizer) == "local":
        out.append(Problem(("model.tokenizer",), "a host path is not visible in the container: keep the tokenizer"
                           " files in the model directory and set model.tokenizer=null"))
    return out


_TARGET_CHECKS = {LocalDeploy: _check_local, DockerDeploy: _check_docker, SlurmDeploy: _check_slurm, K8sDeploy: _check_k8s}


def validate(cfg: GantryConfig) -> list[Problem]:
    """Every problem of the config (empty: deployable)."""
    facts = model_facts(cfg)
    problems = _check_model(cfg, facts) + _check_parallel(cfg, facts) + _check_server(cfg)
    bad_env = [name for name in cfg.deploy.env if not ENV_NAME.fullmatch(str(name))]
    if bad_env:
        problems.append(Problem(("deploy.env",), f"{bad_env[0]!r} is not an environment variable name"))
    if cfg.engine.device not in ("auto", "cuda", "cpu"):
        problems.append(Problem(("engine.device",), f"must be auto, cuda or cpu, got {cfg.engine.device!r}"))
    check = _TARGET_CHECKS.get(type(cfg.deploy))
    if check is None:
        problems.append(Problem(("deploy",), f"unknown target {cfg.deploy.target!r}: local, docker, slurm or k8s"))
    else:
        problems += check(cfg, cfg.deploy)
    if not dns_name(cfg.job_name):
        problems.append(Problem(("job_name",), f"{cfg.job_name!r} has no letters or digits"))
    reserved = (os.path.dirname(CONTAINER_CONFIG), LORA_MOUNT, os.path.dirname(CONTAINER_KEY_FILE))
    found = literal_problems(cfg) + field_problems(cfg, reserved)
    return problems + [Problem((key,), message) for key, message in found]


def _rank_model_path(cfg: GantryConfig, host_path: str | None) -> str | None:
    """The model path as the ranks see it: the host path, or its mount inside a container."""
    if host_path is None:
        return None
    d = cfg.deploy
    if isinstance(d, (DockerDeploy, K8sDeploy)):
        if isinstance(d, K8sDeploy) and d.storage.kind == "pvc":
            return d.model_mount
        if cfg.model.path and cfg.model.path.endswith(".gguf"):
            return f"{d.model_mount}/{os.path.basename(host_path)}"
        return d.model_mount
    return host_path


def lora_mounts(cfg: GantryConfig) -> dict[str, tuple[str, str]]:
    """model.lora_modules: name -> (directory on the host, directory as the ranks see it: its mount in a
    container, read-only, in the order given)."""
    containers = isinstance(cfg.deploy, (DockerDeploy, K8sDeploy))
    out = {}
    for i, (name, path) in enumerate(cfg.model.lora_modules.items()):
        host = os.path.abspath(os.path.expanduser(path))
        out[name] = (host, f"{LORA_MOUNT}/{i}" if containers else host)
    return out


def keyless_local(cfg: GantryConfig) -> bool:
    """deploy=local with the default key variable unset: no key, API on loopback only (vLLM's rule for
    VLLM_API_KEY, made safe: nobody else can reach a keyless server). A variable named explicitly
    (server.api_key_env=OTHER) must be set."""
    s = cfg.server
    return (isinstance(cfg.deploy, LocalDeploy) and not s.api_key and not s.api_key_file
            and s.api_key_env == DEFAULT_KEY_ENV and not os.environ.get(DEFAULT_KEY_ENV))


def _api_key_source(cfg: GantryConfig) -> str:
    s = cfg.server
    if s.api_key:
        return "literal"
    if s.api_key_file:
        return "file"
    if s.api_key_env and not keyless_local(cfg):
        return "env"
    return "none"


def _server_section(cfg: GantryConfig, source: str) -> dict[str, Any]:
    """ServerConfig fields; the key as the ranks find it (containers: GANTRY_API_KEY or a mounted file)."""
    s = cfg.server
    section: dict[str, Any] = {f.name: getattr(cfg.model if f.name in _MODEL_SERVER_KEYS else s, f.name)
                               for f in dataclasses.fields(ServerConfig)
                               if f.name not in ("api_key", "api_key_env", "api_key_file")}
    containers = isinstance(cfg.deploy, (DockerDeploy, K8sDeploy))
    key: dict[str, Any] = {"api_key": None, "api_key_env": None, "api_key_file": None}
    if source == "literal" and not isinstance(cfg.deploy, K8sDeploy):
        key["api_key"] = s.api_key
    elif source in ("literal", "env", "file") and isinstance(cfg.deploy, K8sDeploy):
        key["api_key_env"] = CONTAINER_KEY_ENV  # from the Secret
    elif source == "file":
        key["api_key_file"] = CONTAINER_KEY_FILE if containers else os.path.abspath(os.path.expanduser(s.api_key_file or ""))
    elif source == "env":
        key["api_key_env"] = CONTAINER_KEY_ENV if containers else s.api_key_env
    if keyless_local(cfg) and s.host not in LOOPBACK:
        section["host"] = LOOPBACK[0]
    return {**section, **key}


def _engine_section(cfg: GantryConfig, host_path: str | None) -> dict[str, Any]:
    m, e, p = cfg.model, cfg.engine, cfg.parallel
    served = m.served_model_name or (m.path if model_kind(m.path) == "hub" else None)
    values = {
        "model": _rank_model_path(cfg, host_path), "tokenizer": m.tokenizer, "served_model_name": served,
        "dtype": m.dtype, "max_model_len": m.max_model_len, "load_format": m.load_format,
        "quantization": m.quantization,
        "hf_overrides": dict(m.hf_overrides), "generation_config": m.generation_config,
        "override_generation_config": dict(m.override_generation_config),
        "lora_modules": {name: rank_path for name, (_, rank_path) in lora_mounts(cfg).items()},
        "tensor_parallel_size": p.tensor_parallel_size,
        "pipeline_parallel_size": p.pipeline_parallel_size,
        **{f.name: getattr(e, f.name) for f in dataclasses.fields(e)},
    }
    return values


def _checked(cls: type, values: dict[str, Any], keys: dict[str, str], section: str) -> dict[str, Any] | Problem:
    """values once the engine's own dataclass accepts them (its checks apply), or the Problem.

    Only the fields the launcher sets are written: a field the engine adds later keeps its
    default instead of changing every rendered engine.yaml."""
    try:
        cls(**values)
    except ConfigError as e:
        return Problem((keys.get(e.param, f"{section}.{e.param}"),), str(e).split(": ", 1)[-1])
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}  # the engine's order


def build_plan(cfg: DictConfig | GantryConfig, job_dir: str | Path) -> Plan:
    """Validate cfg and derive everything the targets render; raise PlanError naming the keys."""
    if isinstance(cfg, DictConfig):
        unknown = unknown_keys(cfg)  # `+key=value` adds keys the schema never checks
        if unknown:
            raise PlanError([Problem((key,), message) for key, message in unknown])
    config = to_config(cfg)
    host_path = host_model_path(config)
    source = _api_key_source(config)
    engine = _checked(EngineConfig, _engine_section(config, host_path), _ENGINE_KEYS, "engine")
    server = _checked(ServerConfig, _server_section(config, source), _MODEL_SERVER_KEYS, "server")
    problems = validate(config)
    for section in (engine, server):
        if isinstance(section, Problem) and not any(section.keys[0] in p.keys for p in problems):
            problems.append(section)
    if problems:
        raise PlanError(problems)
    assert isinstance(engine, dict) and isinstance(server, dict)
    return Plan(cfg=config, job_dir=Path(job_dir).resolve(), name=dns_name(config.job_name),
                model_kind=model_kind(config.model.path), host_model_path=host_path,
                engine=engine, server=server, api_key_source=source)
