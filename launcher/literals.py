"""Checks of user strings that the targets write where quoting cannot protect them.

Most strings reach the rendered files through quoting filters (launcher.render). These do not:
`#SBATCH` option lines (sbatch reads its own syntax, and a newline ends the header and starts a
command), image references and Secret keys (also printed in comment lines and commands to copy),
host paths in `docker run -v SRC:DST:ro` (docker splits on ':'), and the shell snippets Slurm runs
as written (deploy.setup, deploy.master_addr_command). Each bad value is reported with its key.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

from launcher.schema import GENERATION_CONFIG_WORDS, DockerDeploy, GantryConfig, K8sDeploy, SlurmDeploy
from launcher.weights import host_model_path, weights_key

Found = tuple[str, str]  # (key, message), as launcher.checks.Problem takes them

# Docker's reference grammar (distribution/reference): [registry[:port]/]path[:tag][@digest]
_HOST = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?/)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF = re.compile(_HOST + _COMPONENT + r"(?:/" + _COMPONENT + r")*(?::[\w][\w.-]{0,127})?"
                       r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")
SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")  # a key of a Secret's data
SBATCH_WORD = re.compile(r"[^\s\x00-\x1f\x7f]+")  # one word: no blank, no control character
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _shell_syntax_error(text: str) -> str | None:
    """bash -n's complaint about text (None: parses, or no bash here to ask)."""
    bash = shutil.which("bash")
    if bash is None:
        return None
    done = subprocess.run([bash, "-n"], input=text, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return None
    return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "bash -n failed"


def _check_slurm(d: SlurmDeploy) -> list[Found]:
    out = []
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(d, key)
        if value and not SBATCH_WORD.fullmatch(value):
            out.append((f"deploy.{key}", f"{value!r} must be one word without blanks or control characters"
                                         " (it is written into an #SBATCH line)"))
    for i, option in enumerate(d.extra_sbatch):
        if not option.startswith("-") or CONTROL.search(option):
            out.append(("deploy.extra_sbatch", f"entry {i}, {option!r}, must be one sbatch option starting with"
                                               " '-', on one line (it is written into an #SBATCH line)"))
    error = _shell_syntax_error("\n".join(d.setup) + "\n")
    if error:
        out.append(("deploy.setup", f"the lines are not valid shell: {error}"))
    error = _shell_syntax_error(f'MASTER_ADDR="$({d.master_addr_command})"\n')
    if error or not d.master_addr_command.strip():
        out.append(("deploy.master_addr_command",
                    f"{d.master_addr_command!r} is not a shell command: {error or 'it is empty'}"))
    return out


def _docker_mount_sources(cfg: GantryConfig) -> list[tuple[str, str]]:
    """(key, host path) of everything docker run mounts with -v SRC:DST:ro (as launcher.targets.docker does)."""
    def host(path: str) -> str:
        return os.path.abspath(os.path.expanduser(path))

    model = host_model_path(cfg)
    sources = [(weights_key(cfg), model)] if model else []
    sources += [(f"model.lora_modules.{name}", host(path)) for name, path in cfg.model.lora_modules.items()]
    if cfg.model.generation_config not in GENERATION_CONFIG_WORDS:
        sources.append(("model.generation_config", host(cfg.model.generation_config)))
    if cfg.server.api_key_file and not cfg.server.api_key:
        sources.append(("server.api_key_file", host(cfg.server.api_key_file)))
    return sources


def literal_problems(cfg: GantryConfig) -> list[Found]:
    """Every value of cfg that its target would write unquotable (see the module docstring)."""
    d, out = cfg.deploy, []
    if isinstance(d, SlurmDeploy):
        out += _check_slurm(d)
    if isinstance(d, (DockerDeploy, K8sDeploy)) and d.image.strip() and not IMAGE_REF.fullmatch(d.image):
        out.append(("deploy.image", f"{d.image!r} is not an image reference like gantry:latest or"
                                    " registry.example.com:5000/team/gantry:0.1"))
    if isinstance(d, K8sDeploy) and not SECRET_KEY.fullmatch(cfg.server.api_key_secret_key):
        out.append(("server.api_key_secret_key", f"{cfg.server.api_key_secret_key!r} is not a Secret key"
                                                 " (letters, digits, '-', '_' and '.')"))
    if isinstance(d, DockerDeploy):
        for key, path in _docker_mount_sources(cfg):
            if ":" in path:
                out.append((key, f"{path!r} has a ':', which docker run -v reads as a separator;"
                                 " move or link it to a path without one"))
    return out
