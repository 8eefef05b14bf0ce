"""Launcher test helpers: compose configs in-process, render jobs in memory, run the CLI, lint.

Renders use a fixed job directory and models_dir so that golden files do not depend on
the machine. Linters fail the test in CI (env CI set) when missing, and skip only outside it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from launcher import schema
from launcher.plan import Plan, PlanError, build_plan
from launcher.render import render_job
from tests.conftest import pythonpath_with_repo

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
JOB_DIR = "/srv/gantry/job"  # where golden jobs "live": no path of this machine
FIXED = ["models_dir=/srv/models", "job_name=gantry-test"]  # machine-independent defaults for renders
K8S_VERSION = "1.30.0"

schema.register()


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python -m launcher OVERRIDES` would compose."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def plan_for(overrides: list[str], job_dir: str = JOB_DIR) -> Plan:
    return build_plan(compose_config(FIXED + overrides), job_dir)


def plan_with(overrides: list[str], values: dict) -> Plan:
    """The plan of overrides with values set afterwards (newlines cannot be typed as overrides)."""
    cfg = compose_config(FIXED + overrides)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return build_plan(cfg, JOB_DIR)


def assert_refused(overrides: list[str], values: dict, key: str) -> None:
    """plan_with refuses the config, and one of its problems names key."""
    with pytest.raises(PlanError) as err:
        plan_with(overrides, values)
    assert any(key in p.keys for p in err.value.problems), err.value


def render(overrides: list[str], job_dir: str = JOB_DIR) -> dict[str, str]:
    """Rendered files of a job (path -> text), without writing them."""
    return {path: text for path, (text, _mode) in render_job(plan_for(overrides, job_dir)).items()}


def require_tool(name: str) -> str:
    """Path of a linter; missing it fails in CI and skips elsewhere."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is required in CI (apt-get install -y {name})")
    pytest.skip(f"{name} is not installed (CI installs it)")


def shellcheck(files: dict[str, str], tmp_path: Path) -> None:
    """Run shellcheck on every shell script among files; fail with its report."""
    scripts = [p for p in files if p.endswith((".sh", ".sbatch"))]
    assert scripts, f"no shell script among {sorted(files)}"
    tool = require_tool("shellcheck")
    paths = []
    for rel in scripts:
        path = tmp_path / "sc" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[rel])
        paths.append(str(path))
    done = subprocess.run([tool, "--shell=bash", "--severity=style", *paths], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def k8s_validate(files: dict[str, str]) -> list[str]:
    """kubernetes-validate --strict (in-process) on every manifest but CRDs; returns the kinds seen."""
    kinds = []
    for rel, text in files.items():
        if not rel.startswith("k8s/"):
            continue
        for doc in yaml.safe_load_all(text):
            kinds.append(doc["kind"])
            if doc["apiVersion"] == "monitoring.coreos.com/v1":
                continue  # a CRD: kubernetes-validate has no schema for it (checked in test_golden)
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    return kinds


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, unset: tuple[str, ...] = (),
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m launcher ARGS` in a fresh interpreter, importing this checkout; env added, unset removed."""
    full_env = {**os.environ, "PYTHONPATH": pythonpath_with_repo(), **(env or {})}
    for name in unset:
        full_env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def job_dir_of(done: subprocess.CompletedProcess) -> Path:
    """The job directory the CLI printed."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("job dir: ")]
    assert len(lines) == 1, done.stdout + done.stderr
    return Path(lines[0].removeprefix("job dir: "))
