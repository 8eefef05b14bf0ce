"""Session fixtures for the real-infrastructure tests: a one-node Slurm cluster, a private
Docker engine, and Gantry's CPU image built in it without any registry.

Every test here is marked `infra`. Locally a test is skipped when a tool or root is
missing; with CI=true it fails instead, so CI can never pass by skipping.
.ci/infra.sh installs the Debian packages these fixtures need.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from .dockerd import DOCKER_TOOLS, DockerEngine
from .images import build_cpu_image
from .slurm import SLURM_TOOLS, SlurmCluster

# The image name the launcher's deploy.image defaults to.
IMAGE = "gantry:latest"

# Debian installs the daemons in sbin, which a non-login shell's PATH may lack.
for _sbin in ("/usr/sbin", "/sbin"):
    if _sbin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{_sbin}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.infra)
            if xdist:  # one worker runs them all: one Slurm cluster, one Docker engine and image build
                item.add_marker(pytest.mark.xdist_group("infra"))


def require(tools: tuple[str, ...], what: str) -> None:
    """Skip (locally) or fail (CI=true) unless we are root and every tool is on PATH."""
    problems = [f"`{tool}` not found" for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0:
        problems.append("not root")
    if not problems:
        return
    message = f"{what} needs {', '.join(problems)}: run .ci/infra.sh as root"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    require(SLURM_TOOLS, "the Slurm cluster")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    require((*DOCKER_TOOLS, "debootstrap"), "the Docker engine")
    engine = DockerEngine(tmp_path_factory.mktemp("dockerd"))
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def gantry_image(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Gantry's CPU image, built once per session from docker/Dockerfile."""
    return build_cpu_image(docker_engine, IMAGE, tmp_path_factory.mktemp("image"))
