"""Every config group option composes; every target renders every parallel layout and
every model, and what it renders passes shellcheck or kubernetes-validate --strict."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from launcher.checks import validate
from launcher.plan import RESERVED_MOUNTS, to_config
from tests.launcher.conftest import CONF_DIR, FIXED, compose_config, k8s_validate, plan_for, render, shellcheck

GROUPS = ("model", "parallel", "deploy", "engine", "server", "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options() -> None:
    assert options("model") == ["deepseek32b", "deepseek7b", "llama3.1-70b", "llama3.1-8b", "qwen2.5-7b",
                                "smollm2", "tiny-llama"]
    assert options("parallel") == ["pp2", "tp1", "tp2", "tp2pp2", "tp4", "tp8", "tp8pp2"]
    assert options("deploy") == ["docker", "k8s", "local", "slurm"]


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_option_composes_into_the_schema(group: str, option: str) -> None:
    cfg = to_config(compose_config(FIXED + [f"{group}={option}"]))
    if group == "deploy":
        assert cfg.deploy.target == option
    if group == "parallel":
        p = cfg.parallel
        assert p.tensor_parallel_size * p.pipeline_parallel_size == p.nnodes * p.gpus_per_node


def test_seed_layouts() -> None:
    """tp2pp2 is the seed's 2 nodes x 2 GPUs; tp8pp2 is 2 x 8."""
    for name, shape in {"tp2pp2": (2, 2, 2, 2), "tp8pp2": (8, 2, 2, 8), "tp4": (4, 1, 1, 4)}.items():
        p = to_config(compose_config(FIXED + [f"parallel={name}"])).parallel
        assert (p.tensor_parallel_size, p.pipeline_parallel_size, p.nnodes, p.gpus_per_node) == shape


def test_deepseek32b_is_the_seeds_model() -> None:
    m = to_config(compose_config(FIXED + ["model=deepseek32b"])).model
    assert (m.path, m.dtype, m.max_model_len) == ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "float16", 128000)
    assert (m.architecture, m.num_attention_heads, m.num_key_value_heads, m.max_position_embeddings) == (
        "Qwen2ForCausalLM", 40, 8, 131072)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_presets_are_valid(experiment: str) -> None:
    cfg = to_config(compose_config(FIXED + [f"experiment={experiment}"]))
    assert validate(cfg, RESERVED_MOUNTS) == []
    plan_for([f"experiment={experiment}"])


# Multi-node runs need the target's own rendezvous fields.
MULTI_NODE = {"local": ["deploy.node_rank=0", "deploy.master_addr=10.0.0.1"],
              "docker": ["deploy.master_addr=10.0.0.1"], "slurm": [], "k8s": []}


@pytest.mark.parametrize("deploy,parallel", list(itertools.product(options("deploy"), options("parallel"))))
def test_every_target_renders_every_layout(deploy: str, parallel: str, tmp_path: Path) -> None:
    """llama3.1-70b (64 heads, 8 KV heads, 80 layers) fits every layout; local needs its weights on disk."""
    overrides = ["model=llama3.1-70b", f"deploy={deploy}", f"parallel={parallel}"]
    if deploy == "local":
        overrides += [f"model.path={tmp_path}", "deploy.python=python3"]
    if to_config(compose_config(FIXED + overrides)).parallel.nnodes > 1:
        overrides += MULTI_NODE[deploy]
    plan = plan_for(overrides)
    files = render(overrides)
    assert "engine.yaml" in files
    if deploy == "k8s":
        k8s_validate(files)
    else:
        shellcheck(files, tmp_path)
    if deploy == "docker":
        assert len([f for f in files if f.endswith(".sh")]) == plan.nnodes


@pytest.mark.parametrize("deploy,model", list(itertools.product(options("deploy"), options("model"))))
def test_every_model_renders_on_one_gpu(deploy: str, model: str, tmp_path: Path) -> None:
    overrides = [f"model={model}", f"deploy={deploy}", "parallel=tp1"]
    if deploy == "local" and model not in ("smollm2", "tiny-llama"):
        overrides.append(f"model.path={tmp_path}")  # local runs check that the weights exist
    files = render(overrides)
    if deploy == "k8s":
        k8s_validate(files)
    else:
        shellcheck(files, tmp_path)
