"""Invalid configurations: `python -m launcher` exits 2, names the keys, renders nothing."""
from __future__ import annotations

from pathlib import Path

import pytest

from launcher.plan import PlanError
from tests.launcher.conftest import plan_for, run_cli

# overrides -> keys the error must name
INVALID: dict[str, tuple[list[str], list[str]]] = {
    "ranks_not_gpus": (["model=llama3.1-8b", "deploy=slurm", "parallel.tensor_parallel_size=4"],
                       ["parallel.tensor_parallel_size", "parallel.gpus_per_node"]),
    "tp_vs_9_heads": (["parallel=tp2"], ["parallel.tensor_parallel_size", "model.num_attention_heads"]),
    "tp8_vs_28_heads": (["model=deepseek7b", "parallel=tp8", "deploy=slurm"], ["model.num_attention_heads"]),
    "tp_vs_kv_heads": (["model=llama3.1-8b", "deploy=slurm", "parallel=tp2", "model.num_attention_heads=12",
                        "model.num_key_value_heads=3"], ["model.num_key_value_heads"]),
    "pp_vs_layers": (["model=tiny-llama", "parallel.pipeline_parallel_size=8", "parallel.gpus_per_node=8"],
                     ["parallel.pipeline_parallel_size", "model.num_hidden_layers"]),
    "context_too_long": (["model=deepseek32b", "parallel=tp4", "deploy=docker", "model.max_model_len=200000"],
                         ["model.max_model_len"]),
    "dtype": (["model.dtype=float64"], ["model.dtype"]),
    "port": (["server.port=70000"], ["server.port"]),
    "master_port_is_api_port": (["parallel.master_port=8000"], ["parallel.master_port", "server.port"]),
    "local_two_nodes": (["model=tiny-llama", "parallel=tp2pp2"], ["deploy.node_rank", "deploy.master_addr"]),
    "local_weights_missing": (["model=llama3.1-8b", "model.path=/nonexistent/llama-8b"], ["model.path"]),
    "docker_no_image": (["deploy=docker", "deploy.image=''"], ["deploy.image"]),
    "docker_two_nodes_no_master": (["model=tiny-llama", "parallel=tp2pp2", "deploy=docker"], ["deploy.master_addr"]),
    "k8s_pvc_without_claim": (["model=llama3.1-8b", "deploy=k8s", "deploy.storage.kind=pvc"],
                              ["deploy.storage.pvc_name"]),
    "k8s_namespace": (["deploy=k8s", "deploy.namespace=Not_A_Label"], ["deploy.namespace"]),
    "slurm_time": (["deploy=slurm", "deploy.time=tomorrow"], ["deploy.time"]),
    "engine_block_size": (["engine.block_size=12"], ["engine.block_size"]),
    "engine_memory_fraction": (["engine.gpu_memory_utilization=1.5"], ["engine.gpu_memory_utilization"]),
    "engine_device": (["engine.device=tpu"], ["engine.device"]),
    "api_key_env_name": (["server.api_key_env=1BAD"], ["server.api_key_env"]),
    "env_name": (["deploy=slurm", "+deploy.env.NOT-A-NAME=1"], ["deploy.env"]),
    # Hydra's advice for a typo is `+key=value`, which adds the key: rejected all the same
    "added_typo": (["+server.prot=8001"], ["server.prot"]),
    "force_added_typo": (["++engine.blok_size=8"], ["engine.blok_size"]),
    "added_nested_typo": (["deploy=k8s", "+deploy.storage.clam=x"], ["deploy.storage.clam"]),
    "added_top_level": (["+submitt=true"], ["submitt"]),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_cli_rejects_invalid_config(case: str, tmp_path: Path) -> None:
    overrides, keys = INVALID[case]
    out = tmp_path / "jobs"
    done = run_cli([*overrides, f"output_dir={out}", "submit=false"], cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("gantry: invalid config: ")]
    assert errors, done.stderr
    for key in keys:
        assert any(key in line for line in errors), f"{key} not named in:\n{done.stderr}"
    assert "job dir:" not in done.stdout
    assert not [p for p in out.rglob("*") if p.is_file()], "files were rendered"
    assert not (out.exists() and any(out.iterdir())), f"left {list(out.iterdir())}"


def test_all_problems_are_reported_together() -> None:
    with pytest.raises(PlanError) as e:
        plan_for(["parallel=tp2", "server.port=0", "model.dtype=double", "deploy=docker", "deploy.image=''"])
    named = {key for problem in e.value.problems for key in problem.keys}
    assert {"model.num_attention_heads", "server.port", "model.dtype", "deploy.image"} <= named


def test_slurm_job_dir_may_hold_spaces(tmp_path: Path) -> None:
    """Job files refer to each other through $JOB_DIR, quoted: no #SBATCH line holds the job dir."""
    plan_for(["deploy=slurm"], job_dir=str(tmp_path / "my jobs" / "x"))


def test_unknown_key_is_one_line(tmp_path: Path) -> None:
    """A typo never reaches the launcher: one line names it and the nearest key."""
    done = run_cli(["deploy=docker", "deploy.imag=x", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "gantry: invalid config: deploy.imag: unknown key (did you mean deploy.image?)"
    assert not (tmp_path / "jobs").exists()


@pytest.mark.parametrize("override,message", [
    ("+server.prot=8001", "server.prot: unknown key (did you mean server.port?)"),
    ("server.prot=8001", "server.prot: unknown key (did you mean server.port?)"),
    ("+deploy.imag=x", "deploy.imag: unknown key (did you mean deploy.image?)"),
])
def test_typo_is_one_line_with_the_nearest_key(override: str, message: str, tmp_path: Path) -> None:
    done = run_cli(["deploy=docker", override, f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"gantry: invalid config: {message}"]


def test_added_keys_are_checked_after_composition_too() -> None:
    """What the command line check cannot see (a sweep, the Compose API) the schema walk catches."""
    with pytest.raises(PlanError) as e:
        plan_for(["deploy=k8s", "+server.prot=8001", "+deploy.storage.clam=x"])
    assert [p.keys for p in e.value.problems] == [("deploy.storage.clam",), ("server.prot",)]
    assert "did you mean server.port?" in str(e.value)


def test_free_form_fields_take_new_keys(tmp_path: Path) -> None:
    """deploy.env, model.hf_overrides and deploy.node_selector are dicts: any key is theirs to add."""
    done = run_cli(["deploy=k8s", "+deploy.env.NCCL_DEBUG=INFO", "+model.hf_overrides.rope_theta=10000",
                    "+deploy.node_selector.pool=gpu", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_valid_config_exits_zero(tmp_path: Path) -> None:
    """The same CLI path with a valid config renders (the cases above fail for their own reason)."""
    done = run_cli(["deploy=docker", f"output_dir={tmp_path / 'jobs'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
