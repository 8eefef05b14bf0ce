"""Deployment targets: each module has context(plan), artefacts(plan) and submit(plan)."""
from __future__ import annotations

import importlib
from types import ModuleType

TARGETS = ("local", "docker", "slurm", "k8s")


def target_module(target: str) -> ModuleType:
    """launcher.targets.<target>."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    return importlib.import_module(f"launcher.targets.{target}")
