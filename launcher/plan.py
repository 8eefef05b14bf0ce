"""Derived values: a composed config becomes a validated Plan.

build_plan raises PlanError with every Problem (launcher.checks) before anything is rendered.
The Plan holds the engine.yaml sections as the ranks of the chosen target will see them: the
model path and adapters at their container mounts, the API key as the ranks find it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from engine.config import ConfigError, EngineConfig, ServerConfig  # torch-free: engine/__init__ is lazy
from launcher.checks import Problem, dns_name, validate
from launcher.keys import unknown_keys
from launcher.schema import GENERATION_CONFIG_WORDS, DockerDeploy, GantryConfig, K8sDeploy, LocalDeploy
from launcher.weights import host_model_path, model_kind

CONTAINER_CONFIG = "/etc/gantry/engine.yaml"  # where docker and k8s mount engine.yaml
CONTAINER_KEY_ENV = "GANTRY_API_KEY"  # the key's variable inside containers and pods
CONTAINER_KEY_FILE = "/run/secrets/gantry-api-key"  # where docker mounts server.api_key_file
DEFAULT_KEY_ENV = "GANTRY_API_KEY"  # server.api_key_env's default: unset on deploy=local means no key
LORA_MOUNT = "/adapters"  # model.lora_modules' directories inside a container: /adapters/<index>
GENERATION_CONFIG_MOUNT = "/generation-config"  # model.generation_config's directory inside a container
RESERVED_MOUNTS = (os.path.dirname(CONTAINER_CONFIG), LORA_MOUNT, os.path.dirname(CONTAINER_KEY_FILE),
                   GENERATION_CONFIG_MOUNT)  # the job's own
LOOPBACK = ("127.0.0.1", "localhost", "::1")

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


def generation_config_mount(cfg: GantryConfig) -> tuple[str, str] | None:
    """model.generation_config as a directory: (its absolute path on the host, the directory as the ranks
    see it: its mount in a container, read-only); None for auto and vllm."""
    path = cfg.model.generation_config
    if path in GENERATION_CONFIG_WORDS:
        return None
    host = os.path.abspath(os.path.expanduser(path))
    return host, GENERATION_CONFIG_MOUNT if isinstance(cfg.deploy, (DockerDeploy, K8sDeploy)) else host


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


def _rank_tokenizer(tokenizer: str | None) -> str | None:
    """model.tokenizer as the ranks see it: a directory or file of this machine made absolute (a Slurm job runs in
    its job directory), anything else (a hub id, gpt2) as given. Containers refuse host paths (launcher.checks)."""
    if tokenizer is not None and os.path.exists(os.path.expanduser(tokenizer)):
        return os.path.abspath(os.path.expanduser(tokenizer))
    return tokenizer


def _engine_section(cfg: GantryConfig, host_path: str | None) -> dict[str, Any]:
    m, e, p = cfg.model, cfg.engine, cfg.parallel
    served = m.served_model_name or (m.path if model_kind(m.path) == "hub" else None)
    values = {
        "model": _rank_model_path(cfg, host_path), "tokenizer": _rank_tokenizer(m.tokenizer), "served_model_name": served,
        "dtype": m.dtype, "max_model_len": m.max_model_len, "load_format": m.load_format,
        "quantization": m.quantization,
        "hf_overrides": dict(m.hf_overrides),
        "generation_config": (generation_config_mount(cfg) or (None, m.generation_config))[1],
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
    problems = validate(config, RESERVED_MOUNTS)
    for section in (engine, server):
        if isinstance(section, Problem) and not any(section.keys[0] in p.keys for p in problems):
            problems.append(section)
    if problems:
        raise PlanError(problems)
    assert isinstance(engine, dict) and isinstance(server, dict)
    return Plan(cfg=config, job_dir=Path(job_dir).resolve(), name=dns_name(config.job_name),
                model_kind=model_kind(config.model.path), host_model_path=host_path,
                engine=engine, server=server, api_key_source=source)
