"""`python -m launcher` end to end: the issue's acceptance renders, engine.yaml as the engine
reads it, the API key kept out of files, Hydra's --help / --cfg job / multirun, and the wheel."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from engine.config import EngineConfig, ServerConfig, load_config_file
from tests.launcher.conftest import REPO_ROOT, job_dir_of, render, require_tool, run_cli, shellcheck


def _files(job_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(job_dir)): p.read_text() for p in job_dir.rglob("*") if p.is_file()}


def test_seed_docker_command(tmp_path: Path) -> None:
    """model=deepseek32b parallel=tp4 deploy=docker: every flag of the seed's docker run, our image."""
    done = run_cli(["model=deepseek32b", "parallel=tp4", "deploy=docker", "deploy.torch_cuda_arch_list=8.0",
                    f"output_dir={tmp_path / 'jobs'}", f"models_dir={tmp_path / 'models'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job_dir = job_dir_of(done)
    script = (job_dir / "run.sh").read_text()
    weights = tmp_path / "models" / "deepseek-ai" / "DeepSeek-R1-Distill-Qwen-32B"
    for flag in ["docker run -d", "-e CUDA_VISIBLE_DEVICES=0,1,2,3", "-e TORCH_CUDA_ARCH_LIST=8.0", "--gpus all",
                 "--name gantry-deepseek32b", f"-v {weights}:/models:ro", "-p 8000:8000", "--ipc=host",
                 "--shm-size=64g", "-e GANTRY_API_KEY \\", "gantry:latest", "--nproc-per-node 4",
                 "--health-cmd", "/ready", "-m engine.serve --config /etc/gantry/engine.yaml",
                 "--model /models --tensor-parallel-size 4 --dtype float16 --max-model-len 128000"]:
        assert flag in script, f"{flag!r} missing from run.sh:\n{script}"
    assert "--api-key" not in script and "my-secret-key" not in script
    assert os.access(job_dir / "run.sh", os.X_OK)
    shellcheck({"run.sh": script}, tmp_path)

    # the seed's vLLM flags live in engine.yaml, which the engine itself must accept
    engine, server = load_config_file(str(job_dir / "engine.yaml"))
    assert (engine.model, engine.tensor_parallel_size, engine.dtype, engine.max_model_len) == ("/models", 4, "float16", 128000)
    assert engine.served_model_name == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert (server.api_key, server.api_key_env, server.port) == (None, "GANTRY_API_KEY", 8000)

    # engine.serve reads the flags after --config as overrides: they must agree with engine.yaml
    from engine.serve import parse_configs

    argv = script.split("-m engine.serve ", 1)[1].replace("\\\n", " ").split()
    argv[argv.index("--config") + 1] = str(job_dir / "engine.yaml")
    assert parse_configs(argv)[:2] == (engine, server)


def test_k8s_tp2pp2_passes_kubernetes_validate(tmp_path: Path) -> None:
    done = run_cli(["deploy=k8s", "parallel=tp2pp2", "model=deepseek32b", "deploy.service_monitor=true",
                    f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifests = sorted((job_dir_of(done) / "k8s").glob("*.yaml"))
    core = [str(p) for p in manifests if p.name != "servicemonitor.yaml"]  # a CRD: no schema to check against
    tool = require_tool("kubernetes-validate")
    checked = subprocess.run([tool, "--strict", "--kubernetes-version", "1.30.0", *core], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    docs = {p.name: yaml.safe_load(p.read_text()) for p in manifests}
    sts = docs["statefulset.yaml"]
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["podManagementPolicy"] == "Parallel"
    pod = sts["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    command = container["command"]
    assert command[:2] == ["/bin/sh", "-c"]  # the node rank is the hostname's ordinal (tests/launcher/test_scripts.py)
    assert '--node-rank "$NODE_RANK"' in command[2]
    assert "--master-addr gantry-deepseek32b-0.gantry-deepseek32b-headless.default.svc" in command[2]
    env = {e["name"]: e for e in container["env"]}
    assert "NODE_RANK" not in env  # not the pod-index label (Kubernetes >= 1.28 only)
    assert env["GANTRY_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "gantry-api-key", "key": "api-key"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1800
    headless = docs["headless-service.yaml"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["serviceName"] == headless["metadata"]["name"]
    api = docs["service.yaml"]
    assert api["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "gantry-deepseek32b-0"
    assert pod and sts["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_slurm_tp2pp2_two_node_sbatch(tmp_path: Path) -> None:
    done = run_cli(["deploy=slurm", "parallel=tp2pp2", "model=deepseek32b", "deploy.partition=gpu",
                    f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job_dir = job_dir_of(done)
    files = _files(job_dir)
    shellcheck(files, tmp_path)
    sbatch, node = files["job.sbatch"], files["node.sh"]
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --partition=gpu", "#SBATCH --output=slurm-%j.out",
                 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1', "does not exist on $(hostname)",
                 "srun --nodes=2 --ntasks-per-node=1"]:
        assert line in sbatch, f"{line!r} missing:\n{sbatch}"
    assert "#SBATCH --account" not in sbatch
    assert '--nnodes "$SLURM_NNODES" --nproc-per-node 2' in node
    assert '--node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR"' in node
    assert sbatch.index("#SBATCH") < sbatch.index("set -euo pipefail")  # sbatch stops reading at the first command


@pytest.mark.parametrize("deploy", ["local", "docker", "slurm", "k8s"])
def test_engine_yaml_is_what_the_engine_reads(deploy: str, tmp_path: Path) -> None:
    files = render([f"deploy={deploy}", "model=tiny-llama", "parallel=pp2", "engine=cpu", "deploy.python=python3"]
                   if deploy == "local" else [f"deploy={deploy}", "model=tiny-llama", "parallel=pp2", "engine=cpu"])
    path = tmp_path / "engine.yaml"
    path.write_text(files["engine.yaml"])
    engine, server = load_config_file(str(path))
    assert isinstance(engine, EngineConfig) and isinstance(server, ServerConfig)
    assert (engine.pipeline_parallel_size, engine.device, engine.load_format) == (2, "cpu", "dummy")
    assert engine.hf_overrides["num_hidden_layers"] == 4
    if deploy == "k8s":
        assert "engine.yaml: |" in files["k8s/configmap.yaml"]
        assert yaml.safe_load(yaml.safe_load(files["k8s/configmap.yaml"])["data"]["engine.yaml"]) == yaml.safe_load(files["engine.yaml"])


@pytest.mark.parametrize("deploy", ["local", "docker", "slurm", "k8s"])
def test_api_key_value_is_never_rendered(deploy: str, tmp_path: Path) -> None:
    out = tmp_path / "jobs"
    extra = ["deploy.python=python3"] if deploy == "local" else []
    done = run_cli([f"deploy={deploy}", "submit=false", f"output_dir={out}", *extra], cwd=tmp_path,
                   env={"GANTRY_API_KEY": "sk-from-the-environment"})
    assert done.returncode == 0, done.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert "sk-from-the-environment" not in path.read_text(), path


def test_literal_api_key_goes_only_where_it_must(tmp_path: Path) -> None:
    """Passed literally: engine.yaml (mode 0600) on hosts, a Secret on Kubernetes; masked in gantry.yaml."""
    for deploy, holders in (("docker", {"engine.yaml"}), ("k8s", {"k8s/secret.yaml"})):
        out = tmp_path / deploy
        done = run_cli([f"deploy={deploy}", "server.api_key=sk-literal", f"output_dir={out}"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        job_dir = job_dir_of(done)
        files = _files(job_dir)
        assert {rel for rel, text in files.items() if "sk-literal" in text} == holders
        assert "<hidden>" in files["gantry.yaml"]
        if deploy == "docker":
            assert (job_dir / "engine.yaml").stat().st_mode & 0o777 == 0o600


def test_help_lists_groups(tmp_path: Path) -> None:
    done = run_cli(["--help"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for text in ["model: deepseek32b", "parallel: pp2, tp1, tp2, tp2pp2", "deploy: docker, k8s, local, slurm",
                 "experiment: deepseek32b_docker_tp4", "python -m launcher model=deepseek32b parallel=tp4"]:
        assert text in done.stdout
    assert not (tmp_path / "jobs").exists()


def test_cfg_job_prints_the_config_and_renders_nothing(tmp_path: Path) -> None:
    done = run_cli(["model=deepseek32b", "deploy=slurm", "--cfg", "job"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    assert cfg["model"]["max_model_len"] == 128000 and cfg["deploy"]["target"] == "slurm"
    assert not (tmp_path / "jobs").exists()


def test_multirun_renders_one_job_per_combination(tmp_path: Path) -> None:
    done = run_cli(["-m", "deploy=docker,slurm,k8s", "parallel=tp1,pp2", "engine=cpu", f"output_dir={tmp_path / 'jobs'}"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    jobs = sorted(p.parent for p in (tmp_path / "jobs").rglob("engine.yaml"))
    assert len(jobs) == 6
    assert {load_config_file(str(j / "engine.yaml"))[0].pipeline_parallel_size for j in jobs} == {1, 2}


def test_submit_false_keeps_local_from_running(tmp_path: Path) -> None:
    done = run_cli(["submit=false", "deploy.python=python3", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (job_dir_of(done) / "run.sh").exists()
    assert "running" not in done.stdout + done.stderr


@pytest.mark.slow
def test_wheel_ships_conf_and_templates(tmp_path: Path) -> None:
    """The launcher finds conf/ and templates/ when installed from the wheel, not the checkout."""
    src = tmp_path / "src"  # a copy: building in the checkout would write build/ beside others' work
    src.mkdir()
    shutil.copy(REPO_ROOT / "pyproject.toml", src)
    for package in ("conf", "launcher", "templates", "engine", "gantry_kernels"):
        shutil.copytree(REPO_ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    wheel = next((tmp_path / "dist").glob("gantry-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for name in ["conf/config.yaml", "conf/model/deepseek32b.yaml", "conf/hydra/help/gantry.yaml",
                 "templates/_macros.j2", "templates/k8s/_pod.yaml.j2", "templates/slurm/job.sbatch.j2"]:
        assert name in names, name
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run([sys.executable, "-m", "launcher", "deploy=k8s", f"output_dir={elsewhere / 'jobs'}"],
                          cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert (job_dir_of(done) / "k8s" / "deployment.yaml").exists()


def test_launcher_sets_every_engine_and_server_field() -> None:
    """EngineConfig/ServerConfig are the contract: a field the engine adds must be exposed here too."""
    import dataclasses

    files = render(["deploy=docker"])
    written = yaml.safe_load(files["engine.yaml"])
    for cls, section in ((EngineConfig, "engine"), (ServerConfig, "server")):
        missing = {f.name for f in dataclasses.fields(cls)} - set(written[section])
        assert not missing, f"{cls.__name__} fields {sorted(missing)} have no launcher key: add them to launcher/schema.py"


def test_readme_launcher_commands_render(tmp_path: Path) -> None:
    """Every `python -m launcher` line of the README, as written (rendered only: submit=false), with
    GANTRY_API_KEY unset as on a fresh shell; a warning is fine, an error is not."""
    readme = (REPO_ROOT / "README.md").read_text()
    commands = [line.split("#", 1)[0].split()[3:] for line in readme.splitlines() if line.startswith("python -m launcher")]
    assert len(commands) >= 4 and ["engine=cpu"] in commands
    for i, args in enumerate(commands):
        extra = [] if "--help" in args else ["submit=false", f"output_dir={tmp_path / str(i)}"]
        done = run_cli(args + extra, cwd=tmp_path, unset=("GANTRY_API_KEY",))
        assert done.returncode == 0, f"{args}: {done.stderr}"
        assert "error" not in done.stderr.lower(), f"{args}: {done.stderr}"
