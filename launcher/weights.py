"""Where a model's weights are on the host, what is known of their shape before any rank loads
them, and the command that fetches them when they are missing."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any

from launcher.schema import GantryConfig

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ModelFacts:
    num_attention_heads: int | None  # None: unknown, the check is skipped
    num_key_value_heads: int | None
    num_hidden_layers: int | None
    max_position_embeddings: int | None


def model_kind(path: str | None) -> str:
    """embedded (null), hub (org/name that is not an existing path) or local."""
    if path is None:
        return "embedded"
    if HUB_ID.fullmatch(path) and not os.path.exists(path):
        return "hub"
    return "local"


def host_model_path(cfg: GantryConfig) -> str | None:
    """Where the weights are on the host/node: the local path, or the hub id's local_dir."""
    kind = model_kind(cfg.model.path)
    if kind == "embedded":
        return None
    if kind == "hub":
        local_dir = cfg.model.local_dir or os.path.join(cfg.models_dir, cfg.model.path or "")
        return os.path.abspath(os.path.expanduser(local_dir))
    return os.path.abspath(os.path.expanduser(cfg.model.path or ""))


def weights_key(cfg: GantryConfig) -> str:
    """The key that places the weights on the host: model.local_dir for a hub id, else model.path."""
    return "model.local_dir" if model_kind(cfg.model.path) == "hub" else "model.path"


def fetch_command(cfg: GantryConfig) -> str:
    """The shell command that puts the weights at host_model_path (a hub id's download)."""
    path = host_model_path(cfg) or ""
    hub_id = cfg.model.path if model_kind(cfg.model.path) == "hub" else "<org>/<name>"
    return f"hf download {shlex.quote(hub_id or '')} --local-dir {shlex.quote(path)}"


def weights_fix(cfg: GantryConfig) -> str:
    """What puts the weights at host_model_path: the download command, or where to copy them."""
    if model_kind(cfg.model.path) == "hub":
        return f"fetch the weights first: {fetch_command(cfg)}"
    if (cfg.model.path or "").endswith(".gguf"):
        return "copy the .gguf file there first"
    return f"copy the model directory there first (e.g. {fetch_command(cfg)})"


def missing_weights(cfg: GantryConfig) -> tuple[str, str] | None:
    """(key, message) when the weights are not at their host path on this machine; None when they are."""
    path = host_model_path(cfg)
    if path is None or os.path.exists(path):
        return None
    return weights_key(cfg), f"{path} does not exist on this machine; {weights_fix(cfg)}"


def model_facts(cfg: GantryConfig) -> ModelFacts:
    """Head and layer counts: the model yaml's hints, then a readable config.json, then hf_overrides."""
    m = cfg.model
    facts: dict[str, Any] = {f.name: getattr(m, f.name) for f in dataclasses.fields(ModelFacts)}
    path = host_model_path(cfg)
    if path and os.path.isfile(os.path.join(path, "config.json")):
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                hf = json.load(f)
        except (OSError, ValueError):
            hf = {}  # the engine reports an unreadable config itself
        facts.update({k: hf[k] for k in facts if isinstance(hf.get(k), int)})
    facts.update({k: v for k, v in m.hf_overrides.items() if k in facts and isinstance(v, int)})
    return ModelFacts(**facts)
