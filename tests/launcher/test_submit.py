"""submit=true: what each target runs, with the cluster CLIs replaced by recording scripts on
PATH (the real Slurm and Docker runs are tests/infra's); and the rendered docker script run
for real against a recording `docker`, to check what it would start."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.launcher.conftest import job_dir_of, run_cli


def _recorder(bin_dir: Path, name: str, stdout: str = "", code: int = 0) -> Path:
    """An executable `name` that appends its argv, GANTRY_API_KEY and cwd (3 lines a call) to bin_dir/name.log."""
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / f"{name}.log"
    script = bin_dir / name
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" "key=${{GANTRY_API_KEY:-}}" "cwd=$PWD" >> "{log}"\n'
                      f'printf "%s" "{stdout}"\nexit {code}\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return log


def _path_with(bin_dir: Path) -> str:
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_slurm_submit_prints_job_id_and_logs(tmp_path: Path) -> None:
    log = _recorder(tmp_path / "bin", "sbatch", stdout="4242;cluster\n")
    done = run_cli(["deploy=slurm", "submit=true", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   env={"PATH": _path_with(tmp_path / "bin"), "GANTRY_API_KEY": "sk-test"})
    assert done.returncode == 0, done.stderr
    job_dir = job_dir_of(done)
    argv, _key, cwd = log.read_text().splitlines()
    assert (argv, cwd) == ("--parsable job.sbatch", f"cwd={job_dir}")  # logs land in the job dir
    assert "slurm job: 4242" in done.stdout
    assert f"stdout: {job_dir / 'slurm-4242.out'}" in done.stdout
    assert f"stderr: {job_dir / 'slurm-4242.err'}" in done.stdout


def test_slurm_submit_needs_the_key_variable(tmp_path: Path) -> None:
    log = _recorder(tmp_path / "bin", "sbatch", stdout="1\n")
    done = run_cli(["deploy=slurm", "submit=true", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   env={"PATH": _path_with(tmp_path / "bin")}, unset=("GANTRY_API_KEY",))
    assert done.returncode == 2 and "GANTRY_API_KEY is not set" in done.stdout + done.stderr
    assert not log.exists()


def test_slurm_submit_failure_is_the_exit_status(tmp_path: Path) -> None:
    _recorder(tmp_path / "bin", "sbatch", stdout="", code=1)
    done = run_cli(["deploy=slurm", "submit=true", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   env={"PATH": _path_with(tmp_path / "bin"), "GANTRY_API_KEY": "sk-test"})
    assert done.returncode == 1
    assert "sbatch failed" in done.stdout + done.stderr


def test_k8s_submit_applies_the_manifests(tmp_path: Path) -> None:
    log = _recorder(tmp_path / "bin", "kubectl")
    done = run_cli(["deploy=k8s", "submit=true", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   env={"PATH": _path_with(tmp_path / "bin")})
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines()[0] == f"apply -f {job_dir_of(done) / 'k8s'}"
    assert "create secret generic gantry-api-key" in done.stdout + done.stderr


def test_k8s_submit_without_kubectl_prints_the_command(tmp_path: Path) -> None:
    empty = tmp_path / "empty"  # the launcher needs no tool from PATH to render and print
    empty.mkdir()
    done = run_cli(["deploy=k8s", "submit=true", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   env={"PATH": str(empty)})
    assert done.returncode == 0, done.stderr
    assert f"kubectl not found; apply with: kubectl apply -f {job_dir_of(done) / 'k8s'}" in done.stdout


def test_docker_submit_runs_the_script(tmp_path: Path) -> None:
    """The script finds its own directory, passes the key by name, and docker gets the seed's flags."""
    log = _recorder(tmp_path / "bin", "docker", stdout="0123abcd\n")
    done = run_cli(["deploy=docker", "submit=true", "parallel=tp2", "model=tiny-llama",
                    f"output_dir={tmp_path / 'jobs'}", "server.api_key_env=MY_KEY"], cwd=tmp_path,
                   env={"PATH": _path_with(tmp_path / "bin"), "MY_KEY": "sk-test"})
    assert done.returncode == 0, done.stdout + done.stderr
    inspect, _key, _cwd, argv, key, _cwd = log.read_text().splitlines()
    job_dir = job_dir_of(done)
    assert inspect == "image inspect gantry:latest"  # a local image: checked before `docker run`
    assert argv.startswith("run -d --init --name gantry-tiny-llama ")
    assert f"-v {job_dir}/engine.yaml:/etc/gantry/engine.yaml:ro" in argv
    assert "-e GANTRY_API_KEY -v" in argv and "sk-test" not in argv  # by name: not on docker's command line
    assert key == "key=sk-test"  # ... and docker's environment has it
    assert "--gpus all" in argv and "-e CUDA_VISIBLE_DEVICES=0,1" in argv and "--nproc-per-node 2" in argv
    assert "API on http://localhost:8000/v1" in done.stdout


def test_docker_script_refuses_to_start_without_the_key(tmp_path: Path) -> None:
    log = _recorder(tmp_path / "bin", "docker")
    done = run_cli(["deploy=docker", "submit=true", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path,
                   env={"PATH": _path_with(tmp_path / "bin")}, unset=("GANTRY_API_KEY",))
    assert done.returncode == 2
    assert "set GANTRY_API_KEY to the API key" in done.stderr
    assert not log.exists()
