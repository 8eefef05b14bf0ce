"""Golden files: one case per template branch, compared with a unified diff; linted too.

Regenerate (only on request): GANTRY_REGEN_GOLDEN=1 pytest tests/launcher/test_golden.py
"""
from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.launcher.conftest import k8s_validate, render, shellcheck

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("GANTRY_REGEN_GOLDEN") == "1"

# case -> overrides; the comment says which template branches it pins.
CASES: dict[str, list[str]] = {
    # local: key check (GANTRY_API_KEY set when rendering), standalone torchrun, no exports
    "local_default": ["deploy.python=python3"],
    # local: GANTRY_API_KEY unset when rendering: no key check, engine.yaml without a key on loopback
    "local_nokey": ["deploy.python=python3"],
    # local: no auth, CUDA_VISIBLE_DEVICES + env exports, static rendezvous of a 2-node group
    "local_multinode": ["model=tiny-llama", "parallel=tp2pp2", "server=noauth", "deploy.python=python3",
                        "deploy.node_rank=1", "deploy.master_addr=10.1.2.3", "deploy.cuda_visible_devices='0,1'",
                        "+deploy.env.NCCL_DEBUG=INFO"],
    # docker: the seed's command (GPUs, arch list, hub weights mounted, key from env, health check, -p)
    "docker_seed_tp4": ["model=deepseek32b", "parallel=tp4", "deploy=docker", "deploy.torch_cuda_arch_list=8.0"],
    # docker: CPU, embedded model (no model volume or weights check), no key, pull never, host network
    "docker_cpu": ["experiment=smollm2_cpu_docker", "server=noauth", "deploy.network_host=true"],
    # docker: an image from a registry (pulled: no local image check)
    "docker_registry_image": ["model=tiny-llama", "deploy=docker", "deploy.image=registry.example/gantry:1.0",
                              "server=noauth"],
    # docker: 2 nodes (one script each, --network host, node rank), key copied from another variable, foreground
    "docker_2node": ["model=deepseek32b", "parallel=tp2pp2", "deploy=docker", "deploy.master_addr=10.0.0.1",
                     "server.api_key_env=MY_KEY", "deploy.detach=false", "deploy.restart=on-failure:3"],
    # docker: a local .gguf file mounted as a file, key from a mounted file, extra volume
    "docker_gguf_keyfile": ["model=llama3.1-8b", "model.path=/data/llama-8b-q4.gguf", "deploy=docker",
                            "server.api_key_file=/etc/gantry/api-key", "deploy.volumes=[/data/cache:/cache]",
                            "deploy.container_name=llama", "deploy.pull=never"],
    # slurm: 2 nodes x 2 GPUs, hub model's weights checked, partition/account/qos/constraint/exclusive/extra
    "slurm_2node": ["experiment=deepseek32b_slurm_2node", "deploy.python=python3", "deploy.partition=gpu", "deploy.account=proj42",
                    "deploy.qos=high", "deploy.constraint=h100", "deploy.exclusive=true",
                    "deploy.extra_sbatch=['--reservation=llm']"],
    # slurm: CPU (no --gpus-per-node), embedded model (no download), venv python, setup lines, no key
    "slurm_cpu_pp2": ["experiment=smollm2_cpu_slurm", "parallel=pp2", "server=noauth",
                      "deploy.python=/opt/gantry/bin/python", "deploy.setup=['module load python']"],
    # slurm: local weights, literal key (written to engine.yaml only)
    "slurm_local_model": ["model=llama3.1-8b", "model.path=/data/llama-8b", "parallel=tp2", "deploy=slurm",
                          "deploy.python=python3", "server.api_key=literal-key"],
    # k8s: one node: Deployment + Service, hostPath, key from the Secret, httpGet probes
    "k8s_single": ["model=llama3.1-8b", "parallel=tp1", "deploy=k8s"],
    # LoRA: adapter directories mounted read-only at /adapters/<i>, engine.yaml naming them there
    "docker_lora": ["model=llama3.1-8b", "deploy=docker", "engine.enable_lora=true", "engine.max_loras=2",
                    "+model.lora_modules.sql=/data/lora/sql", "+model.lora_modules.chat=/data/lora/chat"],
    "k8s_lora": ["model=llama3.1-8b", "parallel=tp1", "deploy=k8s", "engine.enable_lora=true",
                 "+model.lora_modules.sql=/data/lora/sql"],
    # k8s: the seed's 2 x 2 as one torchrun group: StatefulSet + headless Service, ServiceMonitor
    "k8s_2node_monitor": ["experiment=deepseek32b_k8s_2node"],
    # k8s: PVC with subPath, literal key -> Secret manifest, /metrics guarded in the ServiceMonitor
    "k8s_pvc_secret": ["model=qwen2.5-7b", "parallel=tp2", "deploy=k8s", "deploy.storage.kind=pvc",
                       "deploy.storage.pvc_name=models", "deploy.storage.sub_path=qwen2.5-7b",
                       "server.api_key=literal-key", "server.metrics_require_key=true", "deploy.service_monitor=true"],
    # k8s: CPU, embedded model (no model volume), no auth, scheduling fields
    "k8s_cpu_noauth": ["deploy=k8s", "engine=cpu", "server=noauth", "deploy.namespace=llm",
                       "+deploy.node_selector.pool=cpu", "deploy.tolerations=[{key: dedicated, operator: Exists}]",
                       "deploy.runtime_class_name=runc", "deploy.service_type=NodePort"],
    # k8s: CPU 2-pod group (StatefulSet without GPU limits)
    "k8s_2node_cpu": ["model=tiny-llama", "parallel=tp2pp2", "deploy=k8s", "engine=cpu", "server=noauth"],
}


KEYLESS = {"local_nokey"}  # rendered with GANTRY_API_KEY unset; every other case with it set


@pytest.fixture(autouse=True)
def _key_variable(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy=local reads GANTRY_API_KEY when rendering: pin it so goldens do not depend on the shell."""
    case = request.node.callspec.params.get("case") if hasattr(request.node, "callspec") else None
    if case in KEYLESS:
        monkeypatch.delenv("GANTRY_API_KEY", raising=False)
    else:
        monkeypatch.setenv("GANTRY_API_KEY", "sk-golden")


def _diff(expected: str, actual: str, name: str) -> str:
    return "".join(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                        fromfile=f"golden/{name}", tofile=f"rendered/{name}"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    files = render(CASES[case])
    case_dir = GOLDEN / case
    if REGEN:
        shutil.rmtree(case_dir, ignore_errors=True)
        for rel, text in files.items():
            (case_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (case_dir / rel).write_text(text, encoding="utf-8")
        pytest.skip(f"regenerated {case_dir}")
    assert case_dir.is_dir(), f"no golden files for {case}: GANTRY_REGEN_GOLDEN=1 pytest {__file__}"
    golden = {str(p.relative_to(case_dir)): p.read_text(encoding="utf-8") for p in case_dir.rglob("*") if p.is_file()}
    assert sorted(files) == sorted(golden), f"files differ: rendered {sorted(files)}, golden {sorted(golden)}"
    diffs = [_diff(golden[name], files[name], f"{case}/{name}") for name in sorted(files) if files[name] != golden[name]]
    assert not diffs, "rendered files differ from the golden ones (GANTRY_REGEN_GOLDEN=1 to accept):\n" + "\n".join(diffs)


@pytest.mark.parametrize("case", sorted(c for c in CASES if not c.startswith("k8s")))
def test_golden_scripts_pass_shellcheck(case: str, tmp_path: Path) -> None:
    shellcheck(render(CASES[case]), tmp_path)


@pytest.mark.parametrize("case", sorted(c for c in CASES if c.startswith("k8s")))
def test_golden_manifests_pass_kubernetes_validate(case: str) -> None:
    files = render(CASES[case])
    kinds = k8s_validate(files)
    assert "ConfigMap" in kinds and "Service" in kinds
    assert ("StatefulSet" in kinds) != ("Deployment" in kinds)


def test_service_monitor_selects_the_api_service_only() -> None:
    """The CRD kubernetes-validate cannot check: its shape, and that it matches the API Service."""
    files = render(CASES["k8s_pvc_secret"])
    monitor = yaml.safe_load(files["k8s/servicemonitor.yaml"])
    service = yaml.safe_load(files["k8s/service.yaml"])
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["labels"] == {"release": "prometheus"}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] and endpoint["path"] == "/metrics"
    assert endpoint["bearerTokenSecret"] == {"name": "gantry-api-key", "key": "api-key"}
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
