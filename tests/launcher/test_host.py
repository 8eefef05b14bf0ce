"""What the rendering machine lacks: missing weights and images warn at render time (with the command
that fixes them) and make submit=true refuse; the k8s Secret's command on every render; a local
GPU run without the GPUs refused; the README's `python -m launcher engine=cpu` without a key."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml

from tests.launcher.conftest import job_dir_of, run_cli

HUB_ID = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"


def _gantry_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("gantry: ")]


def _recorder(bin_dir: Path, name: str) -> Path:
    """`name` on PATH that records each call's argv into bin_dir/name.log and succeeds."""
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / f"{name}.log"
    script = bin_dir / name
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{log}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


def test_docker_render_warns_of_missing_weights_with_the_download_command(tmp_path: Path) -> None:
    models = tmp_path / "models"
    done = run_cli(["model=deepseek32b", "parallel=tp4", "deploy=docker", f"models_dir={models}",
                    f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    weights = models / HUB_ID
    assert _gantry_lines(done.stderr) == [
        f"gantry: warning: model.local_dir: {weights} does not exist on this machine; fetch the weights first:"
        f" hf download {HUB_ID} --local-dir {weights}"]


def test_submit_refuses_missing_weights_in_one_line(tmp_path: Path) -> None:
    """docker and slurm: nothing runs or is submitted; the line names the key and the command."""
    for deploy, tool in (("docker", "docker"), ("slurm", "sbatch"), ("k8s", "kubectl")):
        log = _recorder(tmp_path / "bin", tool)
        done = run_cli([f"deploy={deploy}", "model=llama3.1-8b", "model.path=/nonexistent/llama-8b", "submit=true",
                        f"output_dir={tmp_path / deploy}"], cwd=tmp_path,
                       env={"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "GANTRY_API_KEY": "sk-x"})
        assert done.returncode == 2, (deploy, done.stdout, done.stderr)
        refusals = [line for line in done.stderr.splitlines() if line.startswith("gantry: cannot submit: ")]
        assert len(refusals) == 1 and refusals[0].startswith(
            "gantry: cannot submit: model.path: /nonexistent/llama-8b does not exist on this machine"), done.stderr
        assert not log.exists(), f"{tool} ran: {log.read_text()}"


def test_submit_runs_once_the_weights_are_there(tmp_path: Path) -> None:
    weights = tmp_path / "llama-8b"
    weights.mkdir()
    log = _recorder(tmp_path / "bin", "sbatch")
    done = run_cli(["deploy=slurm", "model=llama3.1-8b", f"model.path={weights}", "submit=true",
                    f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   env={"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "GANTRY_API_KEY": "sk-x"})
    assert done.returncode == 0, done.stderr
    assert log.read_text().split() == ["--parsable", "job.sbatch"]
    assert "warning" not in done.stderr


def test_k8s_render_prints_the_secret_command_without_submit(tmp_path: Path) -> None:
    """Every render whose pods read a Secret says how to create it (not only submit=true), and so
    does the manifest; a literal key renders the Secret itself, and no key needs none."""
    done = run_cli(["deploy=k8s", "deploy.namespace=llm", f"output_dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    command = 'kubectl -n llm create secret generic gantry-api-key --from-literal=api-key="$GANTRY_API_KEY"'
    assert any(line.endswith(command) for line in _gantry_lines(done.stderr)), done.stderr
    assert command in (job_dir_of(done) / "k8s" / "deployment.yaml").read_text()
    for extra in ("server=noauth", "server.api_key=sk-literal"):
        done = run_cli(["deploy=k8s", extra, f"output_dir={tmp_path / extra[:6]}"], cwd=tmp_path)
        assert done.returncode == 0 and "create secret" not in done.stderr, done.stderr


def test_k8s_render_warns_of_an_image_no_node_can_pull(tmp_path: Path) -> None:
    done = run_cli(["deploy=k8s", "server=noauth", f"output_dir={tmp_path / 'a'}"], cwd=tmp_path)
    warning = [line for line in _gantry_lines(done.stderr) if "deploy.image" in line]
    assert len(warning) == 1 and "docker build -f docker/Dockerfile -t REGISTRY/gantry:latest ." in warning[0]
    assert "docker push REGISTRY/gantry:latest" in warning[0]
    done = run_cli(["deploy=k8s", "server=noauth", "deploy.image=ghcr.io/acme/gantry:1", f"output_dir={tmp_path / 'b'}"],
                   cwd=tmp_path)
    assert done.returncode == 0 and "deploy.image" not in done.stderr, done.stderr


def test_local_gpu_layout_without_gpus_is_refused(tmp_path: Path) -> None:
    """parallel=tp4 deploy=local where torch sees no GPU: one line naming the fields and engine=cpu,
    before any rank starts (the stand-in module would otherwise run 4 CPU ranks)."""
    done = run_cli(["model=tiny-llama", "parallel=tp4", "server=noauth", "deploy.module=tests.launcher.standin_serve",
                    f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert _gantry_lines(done.stderr) == [
        "gantry: cannot submit: parallel.gpus_per_node, engine.device: 4 ranks need 4 GPUs, but this machine has"
        " none visible; add engine=cpu to run them as CPU processes"]
    assert "running" not in done.stdout
    assert not list((tmp_path / "jobs").rglob("ranks"))


def test_local_without_the_key_variable_serves_loopback_only(tmp_path: Path) -> None:
    """The README's `python -m launcher engine=cpu` with GANTRY_API_KEY unset: no key, 127.0.0.1, a warning."""
    done = run_cli(["engine=cpu", "submit=false", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   unset=("GANTRY_API_KEY",))
    assert done.returncode == 0, done.stderr
    job_dir = job_dir_of(done)
    server = yaml.safe_load((job_dir / "engine.yaml").read_text())["server"]
    assert (server["host"], server["api_key"], server["api_key_env"], server["api_key_file"]) == ("127.0.0.1", None, None, None)
    assert "printenv" not in (job_dir / "run.sh").read_text()
    assert _gantry_lines(done.stderr) == [
        "gantry: warning: server.api_key_env: GANTRY_API_KEY is not set: no API key, so the API listens on 127.0.0.1"
        " only (export GANTRY_API_KEY to require a key and listen on 0.0.0.0, or server=noauth to serve anyone"
        " without one)"]


def test_local_with_the_key_variable_requires_it(tmp_path: Path) -> None:
    done = run_cli(["engine=cpu", "submit=false", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   env={"GANTRY_API_KEY": "sk-local"})
    assert done.returncode == 0 and not _gantry_lines(done.stderr), done.stderr
    server = yaml.safe_load((job_dir_of(done) / "engine.yaml").read_text())["server"]
    assert (server["host"], server["api_key_env"]) == ("0.0.0.0", "GANTRY_API_KEY")


def test_local_explicit_key_variable_must_be_set(tmp_path: Path) -> None:
    """A variable named on purpose is a requirement: unset, nothing starts."""
    done = run_cli(["engine=cpu", "server.api_key_env=MY_KEY", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   unset=("MY_KEY",))
    assert done.returncode == 2
    assert "server.api_key_env: environment variable MY_KEY is not set" in done.stdout + done.stderr
