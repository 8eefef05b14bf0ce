"""The rendered scripts run for real against stand-in tools on PATH: what docker's run.sh checks
before `docker run`, what job.sbatch does on a compute node (no download; a moved job directory),
and the rank a multi-node pod's shell command takes from its hostname."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.launcher.conftest import render

HUB_ID = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"


def _tool(bin_dir: Path, name: str, body: str = "") -> Path:
    """An executable `name` in bin_dir that logs its argv (one line a call) to bin_dir/name.log, then runs body."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / f"{name}.log"
    script = bin_dir / name
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{log}"\n{body}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


def _write(files: dict[str, str], job_dir: Path) -> Path:
    for rel, text in files.items():
        (job_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (job_dir / rel).write_text(text)
    return job_dir


def _run(script: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env})


def test_docker_script_stops_before_docker_run_without_the_weights(tmp_path: Path) -> None:
    """Docker would mount an empty directory and the container fail after "API on ..." was printed."""
    job = _write(render(["deploy=docker", "model=deepseek32b", "parallel=tp4", "server=noauth",
                         f"models_dir={tmp_path / 'models'}"]), tmp_path / "job")
    docker = _tool(tmp_path / "bin", "docker")
    done = _run(job / "run.sh", tmp_path / "bin")
    weights = tmp_path / "models" / HUB_ID
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"gantry: model.local_dir: {weights} does not exist on this host; fetch the"
                                        f" weights first: hf download {HUB_ID} --local-dir {weights}"]
    assert "API on" not in done.stdout and not docker.exists()
    weights.mkdir(parents=True)
    done = _run(job / "run.sh", tmp_path / "bin")
    assert done.returncode == 0, done.stderr
    assert docker.read_text().splitlines()[0] == "image inspect gantry:latest"
    assert docker.read_text().splitlines()[1].startswith("run -d --init")


def test_docker_script_prints_the_build_command_for_a_missing_image(tmp_path: Path) -> None:
    """`--pull missing` would try Docker Hub for gantry:latest: the script says how to build it instead."""
    job = _write(render(["deploy=docker", "server=noauth"]), tmp_path / "job")
    docker = _tool(tmp_path / "bin", "docker", 'if [ "$1" = image ]; then echo "No such image" >&2; exit 1; fi')
    done = _run(job / "run.sh", tmp_path / "bin")
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["gantry: deploy.image: gantry:latest is not on this host; build it from the"
                                        " repository root: docker build -f docker/Dockerfile -t gantry:latest ."]
    assert docker.read_text().splitlines() == ["image inspect gantry:latest"]  # no `docker run`


def test_docker_script_pulls_a_registry_image(tmp_path: Path) -> None:
    job = _write(render(["deploy=docker", "server=noauth", "deploy.image=ghcr.io/acme/gantry:1"]), tmp_path / "job")
    docker = _tool(tmp_path / "bin", "docker")
    assert _run(job / "run.sh", tmp_path / "bin").returncode == 0
    calls = docker.read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("run -d --init") and "--pull missing" in calls[0]


def _slurm_tools(bin_dir: Path) -> dict[str, Path]:
    """scontrol names this node; srun runs its command once as node 0; hf and huggingface-cli must not run."""
    return {"scontrol": _tool(bin_dir, "scontrol", "echo node0"),
            "srun": _tool(bin_dir, "srun", 'shift 3; SLURM_NODEID=0 SLURM_NNODES=1 exec "$@"'),
            "hf": _tool(bin_dir, "hf"), "huggingface-cli": _tool(bin_dir, "huggingface-cli")}


def test_sbatch_checks_the_weights_instead_of_downloading(tmp_path: Path) -> None:
    """Compute nodes often have no internet: the job fails at once with the command for a login node."""
    job = _write(render(["deploy=slurm", "model=deepseek32b", "parallel=tp2pp2", "server=noauth",
                         f"models_dir={tmp_path / 'models'}", "deploy.python=python3"]), tmp_path / "job")
    tools = _slurm_tools(tmp_path / "bin")
    done = _run(job / "job.sbatch", tmp_path / "bin", SLURM_SUBMIT_DIR=str(job), SLURM_JOB_ID="7",
                SLURM_JOB_NODELIST="node0")
    weights = tmp_path / "models" / HUB_ID
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"gantry: model.local_dir: {weights} does not exist on ")
    assert line.endswith(f"on a login node, fetch the weights first: hf download {HUB_ID} --local-dir {weights}")
    assert not any(log.exists() for name, log in tools.items() if name != "scontrol")


def test_moved_slurm_job_dir_runs_from_where_it_is(tmp_path: Path) -> None:
    """Rendered for /srv/gantry/job, copied elsewhere (a space in the path): node.sh runs the
    interpreter with the copy's engine.yaml; deploy.python's check comes first."""
    files = render(["deploy=slurm", "engine=cpu", "server=noauth", f"deploy.python={tmp_path / 'bin' / 'python'}"])
    job = _write(files, tmp_path / "moved job")
    _slurm_tools(tmp_path / "bin")
    python = _tool(tmp_path / "bin", "python")
    done = _run(job / "job.sbatch", tmp_path / "bin", SLURM_SUBMIT_DIR=str(job), SLURM_JOB_ID="7",
                SLURM_JOB_NODELIST="node0")
    assert done.returncode == 0, done.stderr
    check, run = python.read_text().splitlines()
    assert check == "-c import torch, engine, launcher.torchrun"
    assert run.startswith("-m launcher.torchrun --nnodes 1 --nproc-per-node 1 --standalone")
    assert run.endswith(f"-m engine.serve --config {job}/engine.yaml")
    assert "/srv/gantry/job" not in files["job.sbatch"] + files["node.sh"]


def test_sbatch_from_another_directory_says_where_to_submit(tmp_path: Path) -> None:
    job = _write(render(["deploy=slurm", "engine=cpu", "server=noauth"]), tmp_path / "job")
    tools = _slurm_tools(tmp_path / "bin")
    done = _run(job / "job.sbatch", tmp_path / "bin", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="7",
                SLURM_JOB_NODELIST="node0")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"gantry: no node.sh in {tmp_path}: submit from the job directory"
                                        " (cd into it, then sbatch job.sbatch)"]
    assert not tools["srun"].exists()


def test_node_script_names_an_interpreter_without_gantry(tmp_path: Path) -> None:
    job = _write(render(["deploy=slurm", "engine=cpu", "server=noauth", "deploy.python=/nonexistent/python"]),
                 tmp_path / "job")
    done = _run(job / "node.sh", tmp_path / "bin", SLURM_NODEID="0", SLURM_NNODES="1")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith("gantry: deploy.python: /nonexistent/python on ")
    assert "cannot import torch and gantry's engine" in line


def test_k8s_pod_takes_its_node_rank_from_the_hostname(tmp_path: Path) -> None:
    """StatefulSet pod <name>-<ordinal>: the ordinal is torchrun's node rank on any Kubernetes version."""
    files = render(["deploy=k8s", "model=tiny-llama", "parallel=tp2pp2", "engine=cpu", "server=noauth"])
    pod = yaml.safe_load(files["k8s/statefulset.yaml"])["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    python = _tool(tmp_path / "bin", "python3")
    sh = shutil.which("sh")
    assert sh
    for hostname, rank in (("gantry-test-0", "0"), ("gantry-test-1", "1"), ("gantry-test-12", "12")):
        done = subprocess.run([sh, "-c", command[2]], capture_output=True, text=True, timeout=30,
                              env={"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "HOSTNAME": hostname})
        assert done.returncode == 0, done.stderr
        argv = python.read_text().splitlines()[-1].split()
        assert argv[argv.index("--node-rank") + 1] == rank


def test_noauth_scripts_hide_the_key_variable_from_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """server=noauth means no key: the engine reads $GANTRY_API_KEY when none is configured (vLLM's rule
    for VLLM_API_KEY), so host-run scripts unset it; with a key configured it stays."""
    monkeypatch.setenv("GANTRY_API_KEY", "sk-when-rendering")  # else deploy=local renders keyless
    python = tmp_path / "bin" / "python"
    _tool(tmp_path / "bin", "python", f'printf "key=%s\\n" "${{GANTRY_API_KEY:-}}" >> "{tmp_path}/seen.log"')
    for server in ("server=noauth", "server=default"):
        job = _write(render(["engine=cpu", server, f"deploy.python={python}"]), tmp_path / server)
        done = _run(job / "run.sh", tmp_path / "bin", GANTRY_API_KEY="sk-from-the-shell")
        assert done.returncode == 0, done.stderr
    assert (tmp_path / "seen.log").read_text().splitlines() == ["key=", "key=sk-from-the-shell"]
