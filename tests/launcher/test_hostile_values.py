"""Strings a user gives that the rendered files cannot quote: refused before anything is rendered,
naming the key (found by fuzzing the launcher). A newline in deploy.partition ended the #SBATCH
header and ran the next line as a command; one in deploy.image did the same from run.sh's comment;
docker run -v split a host path at its ':'; a broken deploy.master_addr_command made job.sbatch
unparsable. Values that can be quoted are kept as given and the scripts stay safe (executed here
with stub commands: nothing the value holds runs); Kubernetes manifests keep $(NAME) literal."""
from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher.render import render_job
from tests.launcher.conftest import assert_refused, plan_with

INJECT = "x\ntouch PWNED"


REFUSED = {
    "sbatch_partition_newline": (["deploy=slurm"], {"deploy.partition": INJECT}, "deploy.partition"),
    "sbatch_account_blank": (["deploy=slurm"], {"deploy.account": "my account"}, "deploy.account"),
    "sbatch_qos_cr": (["deploy=slurm"], {"deploy.qos": "high\rx"}, "deploy.qos"),
    "sbatch_constraint_newline": (["deploy=slurm"], {"deploy.constraint": INJECT}, "deploy.constraint"),
    "sbatch_extra_newline": (["deploy=slurm"], {"deploy.extra_sbatch": ["--reservation=a\ntouch PWNED"]},
                             "deploy.extra_sbatch"),
    "sbatch_extra_not_option": (["deploy=slurm"], {"deploy.extra_sbatch": ["reservation=a"]}, "deploy.extra_sbatch"),
    "master_addr_unbalanced": (["deploy=slurm"], {"deploy.master_addr_command": "echo 'node0"},
                               "deploy.master_addr_command"),
    "master_addr_empty": (["deploy=slurm"], {"deploy.master_addr_command": " "}, "deploy.master_addr_command"),
    "setup_unbalanced": (["deploy=slurm"], {"deploy.setup": ["if true; then"]}, "deploy.setup"),
    "docker_image_newline": (["deploy=docker"], {"deploy.image": INJECT}, "deploy.image"),
    "docker_image_blank": (["deploy=docker"], {"deploy.image": "gantry latest"}, "deploy.image"),
    "k8s_image_quote": (["deploy=k8s"], {"deploy.image": "gantry:'latest"}, "deploy.image"),
    "k8s_secret_key_newline": (["deploy=k8s"], {"server.api_key_secret_key": INJECT}, "server.api_key_secret_key"),
    "docker_model_colon": (["deploy=docker", "engine=cpu"], {"model.path": "/srv/models/qwen:v2"}, "model.path"),
    "docker_lora_colon": (["deploy=docker", "engine=cpu", "engine.enable_lora=true"],
                          {"model.lora_modules": {"sql": "/srv/adapters/sql:v1"}}, "model.lora_modules.sql"),
    "local_gpus_not_a_list": (["engine=cpu"], {"deploy.cuda_visible_devices": "0;touch PWNED"},
                              "deploy.cuda_visible_devices"),
    "docker_gpus_blank": (["deploy=docker"], {"deploy.cuda_visible_devices": "0, 1"}, "deploy.cuda_visible_devices"),
    "docker_key_file_colon": (["deploy=docker", "engine=cpu"], {"server.api_key_file": "/run/key:1"},
                              "server.api_key_file"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_unquotable_value_is_refused_naming_the_key(case: str) -> None:
    assert_refused(*REFUSED[case])


@pytest.mark.parametrize("image", ["gantry:latest", "gantry", "registry.example.com:5000/team/gantry:0.1",
                                   "localhost/gantry", "ghcr.io/org/gantry@sha256:" + "a" * 64, "Registry.io/a/b_c:v1.2-x"])
def test_image_references_are_accepted(image: str) -> None:
    assert plan_with(["deploy=docker"], {"deploy.image": image}).cfg.deploy.image == image


# values kept as given: every one reaches the scripts quoted
KEPT = {
    "slurm": {"deploy.partition": "gpu-a100", "deploy.constraint": "a100&nvlink", "deploy.python": "/opt/my env/$x'py",
              "deploy.extra_sbatch": ["--comment=$(touch PWNED)"], "deploy.env": {"A": INJECT},
              "deploy.setup": ["export HF_HOME=/scratch/hf"]},
    "docker": {"deploy.python": "/opt/my env/$(touch PWNED)", "deploy.env": {"A": "$(touch PWNED)'\"`x`"},
               "deploy.container_name": "gantry.1", "deploy.volumes": ["/a b:/c"]},
    "local": {"deploy.python": "/opt/my env/`touch PWNED`", "deploy.env": {"A": INJECT}},
}


def _stub_path(tmp_path: Path) -> str:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("docker", "srun", "scontrol", "python3", "python", "sbatch", "hostname"):
        (stubs / name).write_text("#!/bin/sh\nexit 0\n")
        (stubs / name).chmod(0o755)
    return f"{stubs}:/usr/bin:/bin"


@pytest.mark.parametrize("target", sorted(KEPT))
def test_kept_values_never_run(target: str, tmp_path: Path) -> None:
    """Every script, run with stub commands, leaves no PWNED file: the values stayed data."""
    plan = plan_with([f"deploy={target}", "engine=cpu"], KEPT[target])
    job = tmp_path / "job"
    files = render_job(plan)
    for rel, (text, _mode) in files.items():
        (job / rel).parent.mkdir(parents=True, exist_ok=True)
        (job / rel).write_text(text)
    env = {"PATH": _stub_path(tmp_path), "HOME": str(tmp_path), "GANTRY_API_KEY": "k", "SLURM_SUBMIT_DIR": str(job),
           "SLURM_NODEID": "0", "SLURM_NNODES": "1"}
    scripts = [rel for rel in files if rel.endswith((".sh", ".sbatch"))]
    assert scripts
    for rel in scripts:
        assert subprocess.run(["bash", "-n", str(job / rel)], capture_output=True).returncode == 0, rel
        subprocess.run(["bash", str(job / rel)], cwd=job, env=env, capture_output=True, timeout=60)
    assert not [p for p in (*job.iterdir(), *tmp_path.iterdir()) if p.name.startswith("PWNED")]


def test_docker_health_check_quotes_the_interpreter() -> None:
    """docker runs --health-cmd through sh -c: the interpreter is one word there too."""
    files = render_job(plan_with(["deploy=docker", "engine=cpu"], {"deploy.python": "/opt/my env/python"}))
    line = next(line for line in files["run.sh"][0].splitlines() if "--health-cmd" in line)
    health_cmd = shlex.split(line.removesuffix("\\"))[1]
    assert shlex.split(health_cmd)[0] == "/opt/my env/python"


def _k8s_expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of env values and command words: $$ is $, $(NAME) a defined variable."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i:]:
            end = text.index(")", i)
            name = text[i + 2:end]
            out.append(env.get(name, text[i:end + 1]))
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize("nodes", [["parallel=tp1"], ["model=tiny-llama", "parallel=tp2pp2"]], ids=["one", "two"])
def test_k8s_keeps_dollar_references_literal(nodes: list[str]) -> None:
    """Kubernetes expands $(NAME) in env values and in the command: deploy.env.A='$(GANTRY_API_KEY)'
    became the API key, and an interpreter path holding $(X) changed."""
    files = render_job(plan_with(["deploy=k8s", "engine=cpu", *nodes],
                                 {"deploy.env": {"A": "$(GANTRY_API_KEY)", "B": "a$$b$c"}, "deploy.python": "/opt/$(B)/py"}))
    manifest = next(text for path, (text, _) in files.items() if path.endswith(("deployment.yaml", "statefulset.yaml")))
    container = yaml.safe_load(manifest)["spec"]["template"]["spec"]["containers"][0]
    pod_env = {"GANTRY_API_KEY": "sk-secret", "B": "bee"}
    env = {e["name"]: _k8s_expand(e["value"], pod_env) for e in container["env"] if "value" in e}
    assert env["A"] == "$(GANTRY_API_KEY)" and env["B"] == "a$$b$c"
    command = " ".join(_k8s_expand(word, pod_env) for word in container["command"])
    assert "/opt/$(B)/py" in command and "sk-secret" not in command
