"""Unknown config keys, whatever their prefix: `+server.prot=8001` adds a key Hydra's schema never checks.

Every key must be a field of its schema dataclass (dict fields such as deploy.env take any key);
each unknown key is reported as (key, message) with the nearest known key.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from launcher.schema import (DeployConfig, DockerDeploy, EngineOptions, GantryConfig, K8sDeploy, LocalDeploy, ModelConfig,
                             ParallelConfig, ServerOptions, SlurmDeploy)

GROUPS = ("model", "parallel", "deploy", "engine", "server", "experiment", "hydra")  # `group=option` names
DEPLOY_SCHEMAS = (LocalDeploy, DockerDeploy, SlurmDeploy, K8sDeploy)
_DEPLOY_BY_TARGET: dict[str, type] = {cls.target: cls for cls in DEPLOY_SCHEMAS}


def _fields(cls: type) -> dict[str, Any]:
    """Field name -> its type (strings resolved), of a schema dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _group_fields() -> dict[str, str]:
    """Field name -> its key in a group (engine options, server, model, parallel, deploy of any target)."""
    schemas = [("model", ModelConfig), ("parallel", ParallelConfig), ("engine", EngineOptions), ("server", ServerOptions)]
    schemas += [("deploy", cls) for cls in (DeployConfig, *DEPLOY_SCHEMAS)]
    out: dict[str, str] = {}
    for group, cls in schemas:
        out.update({name: f"{group}.{name}" for name in _fields(cls) if name not in out})
    return out


def _message(key: str, name: str, known: list[str]) -> tuple[str, str]:
    """The unknown key's line: the same field in another group (engine.max_model_len is model.max_model_len,
    vLLM's --max-model-len spelt with dashes too), else the nearest key here, else the keys here."""
    parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
    elsewhere = _group_fields().get(name.replace("-", "_"))
    if elsewhere and elsewhere != key:
        return key, f"unknown key (did you mean {elsewhere}?)"
    known = sorted(set(known))
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean {parent}{near[0]}?" if near else f"known keys here: {', '.join(known)}"
    return key, f"unknown key ({hint})"


def unknown_keys(cfg: DictConfig) -> list[tuple[str, str]]:
    """Keys of the composed config that its schema does not have, e.g. ("server.prot", "unknown key (...)")."""
    out: list[tuple[str, str]] = []

    def walk(node: DictConfig, prefix: str) -> None:
        cls = OmegaConf.get_type(node)
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return  # a dict field: free-form keys
        known = list(_fields(cls))
        for key in node.keys():
            path = f"{prefix}{key}"
            if key not in known:
                target = node.get("target") if issubclass(cls, DeployConfig) else None
                out.append(_other_target(path, str(key), target) or _message(path, str(key), known))
                continue
            child = node._get_node(key)  # the node itself: no interpolation is resolved here
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{path}.")

    walk(cfg, "")
    return out


def _other_target(key: str, name: str, target: str | None) -> tuple[str, str] | None:
    """deploy.NAME when NAME is a field of other targets only: deploy=local has no image."""
    owners = [cls.target for cls in DEPLOY_SCHEMAS if name in _fields(cls) and cls.target != target]
    if target is None or not owners or name in _fields(_DEPLOY_BY_TARGET.get(target, DeployConfig)):
        return None
    return key, f"deploy={target} has no {name}; it is a field of {' and '.join(f'deploy={o}' for o in owners)}"


def _chosen_target(args: list[str]) -> str | None:
    """The deploy target the command line picks (deploy=docker; none given and no experiment: local);
    None when an experiment or a sweep decides."""
    choices = [arg.split("=", 1)[1] for arg in args if arg.split("=", 1)[0].lstrip("+") == "deploy" and "=" in arg]
    if choices:
        return choices[-1] if choices[-1] in _DEPLOY_BY_TARGET else None
    experiments = [arg for arg in args if arg.split("=", 1)[0].lstrip("+") == "experiment" and arg != "experiment=null"]
    return None if experiments else "local"


def _schema_of(head: str) -> list[type]:
    """The dataclasses a dotted key starting with head may belong to (deploy: any target's)."""
    top = _fields(GantryConfig)
    if head == "deploy":
        return [DeployConfig, *DEPLOY_SCHEMAS]
    return [top[head]] if head in top and dataclasses.is_dataclass(top[head]) else []


def unknown_override_keys(args: list[str]) -> list[tuple[str, str]]:
    """Command-line overrides naming a key no schema has, before Hydra composes (its own error suggests
    `+key=value`, which would then add the typo)."""
    out = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # a flag (--cfg job, -m) or a flag's value
        key = arg.split("=", 1)[0].lstrip("~+").split("@", 1)[0]
        parts = key.split(".")
        if "/" in key or parts[0] == "hydra" or (len(parts) == 1 and parts[0] in GROUPS):
            continue  # a config group choice or Hydra's own settings
        if len(parts) == 1:
            known = list(_fields(GantryConfig)) + [g for g in GROUPS if g != "hydra"]
            if key not in known:
                out.append(_message(key, key, known))
            continue
        schemas = _schema_of(parts[0])
        if not schemas:
            out.append(_message(parts[0], parts[0], list(_fields(GantryConfig))))
            continue
        problem = _check_path(parts, schemas)
        if parts[0] == "deploy" and not problem and not arg.startswith("+"):
            problem = _other_target(key, parts[1], _chosen_target(args))
        if problem:
            out.append(problem)
    return out


def unparsable_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Command-line overrides Hydra's grammar cannot read, as (key, message): Hydra's own error
    ("mismatched input '=' expecting <EOF>") names neither the key nor the fix."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser, out = OverridesParser.create(), []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # a flag (--cfg job, -m) or a flag's value
        try:
            parser.parse_override(arg)
        except HydraException as e:
            key, value = arg.split("=", 1)
            form = {"[": "['ITEM', ...]", "{": "{NAME: 'VALUE', ...}"}.get(value.lstrip()[:1], "'VALUE'")
            what = "each item" if form.startswith("[") else "each value" if form.startswith("{") else "a value"
            out.append((key, f"cannot read {arg!r} ({e}); quote {what} holding blanks, '=', quotes, brackets"
                             f" or commas: {key}={form} (in the shell: \"{key}={form}\")"))
    return out


def _check_path(parts: list[str], schemas: list[type]) -> tuple[str, str] | None:
    """parts[1:] followed through the schemas; the first unknown component, if any."""
    for depth in range(1, len(parts)):
        fields = {name: hint for cls in schemas for name, hint in _fields(cls).items()}
        name = parts[depth]
        if name not in fields:
            return _message(".".join(parts[:depth + 1]), name, list(fields))
        hint = fields[name]
        if not dataclasses.is_dataclass(hint):
            return None  # a leaf, or a dict/list field whose keys are free
        schemas = [hint]
    return None
