"""Fields the engine never sees, in the form the target's tool parses: refused before rendering,
naming the key (found by fuzzing the launcher). Each was accepted and failed only when the job
ran: kubectl or sbatch rejected a quantity, docker a health interval or a mount point, or the
value silently meant something else ("" as model.path served the current directory; a missing
LoRA directory under deploy=local stopped the engine after torchrun had started)."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.launcher.conftest import assert_refused, plan_with, run_cli


K8S = ["deploy=k8s"]
DOCKER = ["deploy=docker"]
REFUSED = {
    "empty_model_path": (DOCKER, {"model.path": ""}, "model.path"),
    "blank_local_dir": (["model=llama3.1-8b", "deploy=slurm"], {"model.local_dir": " "}, "model.local_dir"),
    "empty_served_name": (DOCKER, {"model.served_model_name": ""}, "model.served_model_name"),
    "empty_module": (DOCKER, {"deploy.module": ""}, "deploy.module"),
    "module_with_blank": (["deploy=slurm"], {"deploy.module": "engine serve"}, "deploy.module"),
    "key_and_key_file": (DOCKER, {"server.api_key": "sk-1", "server.api_key_file": "/run/key"}, "server.api_key"),
    "docker_health_interval": (DOCKER, {"deploy.health_interval_s": 0}, "deploy.health_interval_s"),
    "docker_health_start": (DOCKER, {"deploy.health_start_period_s": -1}, "deploy.health_start_period_s"),
    "docker_mount_root": (["deploy=docker", "model=llama3.1-8b"], {"deploy.model_mount": "/"}, "deploy.model_mount"),
    "docker_mount_config": (["deploy=docker", "model=llama3.1-8b"], {"deploy.model_mount": "/etc"},
                            "deploy.model_mount"),
    "k8s_mount_adapters": (["deploy=k8s", "model=llama3.1-8b"], {"deploy.model_mount": "/adapters/x"},
                           "deploy.model_mount"),
    "k8s_cpu": (K8S, {"deploy.cpu": "lots"}, "deploy.cpu"),
    "k8s_memory": (K8S, {"deploy.memory": "64 GB"}, "deploy.memory"),
    "k8s_shm_size": (K8S, {"deploy.shm_size": "64GB"}, "deploy.shm_size"),
    "k8s_node_selector": (K8S, {"deploy.node_selector": {"gpu type": "h200"}}, "deploy.node_selector"),
    "k8s_monitor_labels": (["deploy=k8s", "deploy.service_monitor=true"],
                           {"deploy.service_monitor_labels": {"release": "prom etheus"}}, "deploy.service_monitor_labels"),
    "k8s_sub_path": (["deploy=k8s", "model=llama3.1-8b", "deploy.storage.kind=pvc", "deploy.storage.pvc_name=w"],
                     {"deploy.storage.sub_path": "../other"}, "deploy.storage.sub_path"),
    "slurm_mem": (["deploy=slurm"], {"deploy.mem": "64GB"}, "deploy.mem"),
    "k8s_toleration": (K8S, {"deploy.tolerations": [{"key": "gpu", "operater": "Exists"}]}, "deploy.tolerations"),
    "job_name_escapes": (DOCKER, {"job_name": "../elsewhere"}, "job_name"),
    "server_host_blank": (["deploy=slurm"], {"server.host": "0.0.0.0 "}, "server.host"),
    "master_addr_newline": (["deploy=docker", "model=tiny-llama", "parallel=tp2pp2", "engine=cpu"],
                            {"deploy.master_addr": "node0\nnode1"}, "deploy.master_addr"),
    "python_option": (["deploy=slurm"], {"deploy.python": "-x"}, "deploy.python"),
    "k8s_pvc_name": (["deploy=k8s", "model=llama3.1-8b", "deploy.storage.kind=pvc"],
                     {"deploy.storage.pvc_name": "My Weights"}, "deploy.storage.pvc_name"),
    "k8s_runtime_class": (K8S, {"deploy.runtime_class_name": "nvidia runtime"}, "deploy.runtime_class_name"),
    "local_missing_adapter": (["engine=cpu", "engine.enable_lora=true"],
                              {"model.lora_modules": {"sql": "/nonexistent/adapters/sql"}}, "model.lora_modules.sql"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_field_is_refused_naming_it(case: str) -> None:
    assert_refused(*REFUSED[case])


ACCEPTED = {
    "k8s_quantities": (K8S, {"deploy.cpu": "500m", "deploy.memory": "64G", "deploy.shm_size": "1.5Gi"}),
    "k8s_labels": (["deploy=k8s", "deploy.service_monitor=true"],
                   {"deploy.node_selector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
                    "deploy.service_monitor_labels": {"release": ""}}),
    "k8s_sub_path": (["deploy=k8s", "model=llama3.1-8b", "deploy.storage.kind=pvc", "deploy.storage.pvc_name=w"],
                     {"deploy.storage.sub_path": "models/llama"}),
    "slurm_mem": (["deploy=slurm"], {"deploy.mem": "0"}),
    "ipv6_host": (["deploy=slurm"], {"server.host": "::"}),
    "master_addr": (["deploy=docker", "model=tiny-llama", "parallel=tp2pp2", "engine=cpu"],
                    {"deploy.master_addr": "node-0.cluster.local"}),
    "docker_mount": (["deploy=docker", "model=llama3.1-8b"], {"deploy.model_mount": "/mnt/weights"}),
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_good_field_is_kept(case: str) -> None:
    overrides, values = ACCEPTED[case]
    plan = plan_with(overrides, values)
    for key, value in values.items():
        assert OmegaConf.select(OmegaConf.structured(plan.cfg), key) == value


def test_local_adapter_that_exists_is_served(tmp_path: Path) -> None:
    plan = plan_with(["engine=cpu", "engine.enable_lora=true"], {"model.lora_modules": {"sql": str(tmp_path)}})
    assert plan.engine["lora_modules"] == {"sql": str(tmp_path)}


def test_job_name_out_of_output_dir_leaves_nothing(tmp_path: Path) -> None:
    """Hydra made the run directory beside output_dir, where the empty-directory clean-up never looked."""
    done = run_cli(["deploy=docker", "job_name=../elsewhere", f"output_dir={tmp_path / 'jobs'}", "submit=false"],
                   cwd=tmp_path)
    assert done.returncode == 2 and "job_name" in done.stderr, done.stderr
    assert not (tmp_path / "elsewhere").exists()


def test_missing_adapter_is_a_warning_and_blocks_submit(tmp_path: Path) -> None:
    """docker run -v would create the missing directory (empty, root's) and the engine fail on it."""
    args = ["deploy=docker", "engine=cpu", "engine.enable_lora=true", "+model.lora_modules.sql=/nonexistent/sql",
            f"output_dir={tmp_path / 'jobs'}"]
    rendered = run_cli([*args, "submit=false"], cwd=tmp_path)
    assert rendered.returncode == 0 and "warning: model.lora_modules.sql: /nonexistent/sql" in rendered.stderr
    submitted = run_cli([*args, "submit=true"], cwd=tmp_path)
    assert submitted.returncode == 2, submitted.stdout + submitted.stderr
    assert "cannot submit: model.lora_modules.sql" in submitted.stderr
