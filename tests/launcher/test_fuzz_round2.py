"""Defects found by driving `python -m launcher` as a production user would (one test each): hints that
led to the wrong key, a Secret manifest readable by anyone, '$' in a value failing shellcheck, a
generation_config directory the container never saw, an API port nobody could reach, the Secret's
command ignoring where the key is, a traceback for a zero head count, a swept literal key printed, a key
in deploy.env."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import yaml

from launcher.host import secret_command
from launcher.keys import unknown_override_keys, unparsable_overrides
from launcher.plan import PlanError, build_plan
from launcher.render import render_job, shell_quote
from tests.launcher.conftest import (assert_refused, compose_config, k8s_validate, plan_for, plan_with, run_cli,
                                     shellcheck)


@pytest.mark.parametrize(("arg", "hint"), [
    ("engine.max_model_len=4096", "model.max_model_len"),  # vLLM's engine argument lives under model here
    ("engine.quantization=fp8", "model.quantization"),
    ("engine.tensor_parallel_size=2", "parallel.tensor_parallel_size"),
    ("server.served_model_name=x", "model.served_model_name"),
    ("engine.max-model-len=4096", "model.max_model_len"),  # the vLLM flag's spelling
    ("max_model_len=4096", "model.max_model_len"),
    ("model.api_key=x", "server.api_key"),
])
def test_unknown_key_names_the_group_that_has_it(arg: str, hint: str) -> None:
    """engine.max_model_len was 'did you mean engine.max_lora_rank?'."""
    [(key, message)] = unknown_override_keys([arg])
    assert key == arg.split("=")[0] and f"did you mean {hint}?" in message


def test_deploy_field_of_another_target_names_that_target() -> None:
    """deploy.image without deploy=docker: Hydra advised +deploy.image, which then got 'did you mean deploy.target?'."""
    [(key, message)] = unknown_override_keys(["deploy.image=registry.example.com/gantry:1"])
    assert key == "deploy.image" and "deploy=local has no image" in message and "deploy=docker" in message
    assert unknown_override_keys(["deploy=docker", "deploy.image=x"]) == []
    assert unknown_override_keys(["experiment=smollm2_cpu_docker", "deploy.image=x"]) == []  # the experiment decides
    with pytest.raises(PlanError) as err:
        build_plan(compose_config(["+deploy.image=x"]), "/srv/gantry/job")
    assert "deploy=local has no image" in str(err.value)


def test_rendered_secret_is_private() -> None:
    """k8s/secret.yaml holds a literal key: it was written 0644 while engine.yaml with the same key was 0600."""
    files = render_job(plan_for(["deploy=k8s", "server.api_key=sk-literal"]))
    assert files["k8s/secret.yaml"][1] == 0o600
    assert all(mode != 0o600 for path, (_, mode) in files.items() if path != "k8s/secret.yaml")


DOLLARS = "my model $HOME `id` it's \"q\" \\ ü"


@pytest.mark.parametrize("target", ["local", "docker", "slurm"])
def test_dollar_values_pass_shellcheck_and_stay_literal(target: str, tmp_path: Path) -> None:
    """A '$' in a value was single-quoted: shellcheck's SC2016 failed the rendered scripts."""
    files = render_job(plan_with([f"deploy={target}", "engine=cpu"], {"deploy.env": {"A": DOLLARS}}))
    shellcheck({path: text for path, (text, _) in files.items()}, tmp_path)
    quoted = shell_quote(DOLLARS)
    assert subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True, text=True).stdout == DOLLARS


def test_generation_config_directory_reaches_the_ranks(tmp_path: Path) -> None:
    """model.generation_config=/host/dir went into engine.yaml as is: no container mounted it."""
    gen = tmp_path / "gen cfg"
    gen.mkdir()
    docker = render_job(plan_with(["deploy=docker", "engine=cpu"], {"model.generation_config": str(gen)}))
    assert yaml.safe_load(docker["engine.yaml"][0])["engine"]["generation_config"] == "/generation-config"
    assert shell_quote(f"{gen}:/generation-config:ro") in docker["run.sh"][0]
    k8s = {p: t for p, (t, _) in render_job(plan_with(["deploy=k8s", "engine=cpu"],
                                                      {"model.generation_config": str(gen)})).items()}
    k8s_validate(k8s)
    pod = yaml.safe_load(k8s["k8s/deployment.yaml"])["spec"]["template"]["spec"]
    assert {"name": "generation-config", "hostPath": {"path": str(gen), "type": "Directory"}} in pod["volumes"]
    slurm = render_job(plan_with(["deploy=slurm", "engine=cpu"], {"model.generation_config": "~/gen"}))
    assert Path(yaml.safe_load(slurm["engine.yaml"][0])["engine"]["generation_config"]).is_absolute()
    assert_refused(["engine=cpu"], {"model.generation_config": str(tmp_path / "none")}, "model.generation_config")
    assert_refused(["deploy=docker"], {"deploy.model_mount": "/generation-config"}, "deploy.model_mount")


@pytest.mark.parametrize(("overrides", "key"), [
    (["deploy=docker", "server.host=127.0.0.1"], "server.host"),  # -p reaches the container's own IP
    (["deploy=k8s", "server.host=localhost"], "server.host"),  # the Service and the probes reach the pod's IP
    (["deploy=local", "deploy.stop_timeout_s=nan"], "deploy.stop_timeout_s"),
    (["deploy=k8s", f"deploy.startup_timeout_s={10 ** 12}"], "deploy.startup_timeout_s"),  # failureThreshold is int32
    (["model.num_key_value_heads=0"], "model.num_key_value_heads"),  # was a ZeroDivisionError traceback
    (["model.num_attention_heads=-1"], "model.num_attention_heads"),
    # a key in deploy.env was written in plain text, and in a pod hid the Secret's value
    (["deploy=k8s", "+deploy.env.GANTRY_API_KEY=sk-plain"], "deploy.env.GANTRY_API_KEY"),
    (["deploy=slurm", "server.api_key_env=MY_KEY", "+deploy.env.MY_KEY=sk-plain"], "deploy.env.MY_KEY"),
    (["deploy=docker", "+deploy.env.CUDA_VISIBLE_DEVICES=3"], "deploy.env.CUDA_VISIBLE_DEVICES"),  # set twice
    (["deploy=k8s", "job_name=7b-Chat"], "job_name"),  # '7b-chat' is no Service name (DNS-1035: a letter first)
    (["deploy=k8s", "deploy.namespace=" + "n" * 64], "deploy.namespace"),  # a DNS label has at most 63
])
def test_unusable_value_is_refused(overrides: list[str], key: str) -> None:
    assert_refused(overrides, {}, key)


def test_loopback_host_with_the_hosts_network_is_kept() -> None:
    assert plan_for(["deploy=docker", "deploy.network_host=true", "server.host=127.0.0.1"]).server["host"] == "127.0.0.1"
    assert plan_for(["deploy=k8s", "server.host=::"]).server["host"] == "::"
    assert math.isfinite(plan_for(["deploy.stop_timeout_s=5"]).cfg.deploy.stop_timeout_s)


def test_secret_command_reads_the_key_from_where_it_is(tmp_path: Path) -> None:
    """It always said --from-literal=api-key="$GANTRY_API_KEY", whatever server.api_key_env or api_key_file named."""
    assert '--from-literal=api-key="$MY_KEY"' in secret_command(plan_for(["deploy=k8s", "server.api_key_env=MY_KEY"]))
    key = tmp_path / "api key"
    key.write_text("sk-file\n")
    command = secret_command(plan_with(["deploy=k8s"], {"server.api_key_file": str(key)}))
    assert f"--from-literal=api-key=\"$(cat '{key}')\"" in command
    done = subprocess.run(["bash", "-c", 'printf %s "$(cat \'' + str(key) + '\')"'], capture_output=True, text=True)
    assert done.stdout == "sk-file"  # the file's newline is not part of the key


def test_setup_sourcing_a_venv_passes_shellcheck(tmp_path: Path) -> None:
    """deploy.setup=['source /opt/venv/bin/activate'] (the documented use) failed shellcheck (SC1091)."""
    files = render_job(plan_with(["deploy=slurm", "engine=cpu"], {"deploy.setup": ['source "/opt/my env/bin/activate"']}))
    shellcheck({path: text for path, (text, _) in files.items()}, tmp_path)


def test_swept_literal_key_is_refused_and_a_yaml_key_kept_private(tmp_path: Path) -> None:
    """-m with server.api_key=... printed the key in every job's log line and in a world-readable multirun.yaml."""
    done = run_cli(["-m", "deploy=docker,k8s", "server.api_key=sk-swept", f"output_dir={tmp_path / 'a'}"], cwd=tmp_path)
    assert done.returncode == 2 and "sk-swept" not in done.stdout + done.stderr
    assert "gantry: invalid config: server.api_key: a sweep" in done.stderr
    conf = tmp_path / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "keyed.yaml").write_text("# @package _global_\nserver:\n  api_key: sk-yaml\n")
    done = run_cli(["--config-dir", str(tmp_path / "conf"), "-m", "deploy=docker,slurm", "experiment=keyed",
                    f"output_dir={tmp_path / 'b'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [swept] = (tmp_path / "b").rglob("multirun.yaml")
    assert swept.stat().st_mode & 0o777 == 0o600


def test_relative_tokenizer_is_made_absolute_for_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.tokenizer=tok (a directory here) reached engine.yaml as 'tok': the Slurm job runs in its job directory."""
    (tmp_path / "tok").mkdir()
    monkeypatch.chdir(tmp_path)
    engine = plan_for(["deploy=slurm", "engine=cpu", "model.tokenizer=tok"]).engine
    assert engine["tokenizer"] == str(tmp_path / "tok")
    assert plan_for(["deploy=slurm", "engine=cpu", "model.tokenizer=org/tokenizer"]).engine["tokenizer"] == "org/tokenizer"


def test_unreadable_list_override_shows_the_list_form() -> None:
    """deploy.extra_sbatch=[--reservation=x] (the schema's own example unquoted) was told to quote the whole value,
    which makes a string where a list is expected."""
    [(key, message)] = unparsable_overrides(["deploy.extra_sbatch=[--reservation=x]"])
    assert key == "deploy.extra_sbatch" and "deploy.extra_sbatch=['ITEM', ...]" in message
    [(_, message)] = unparsable_overrides(["model.served_model_name=a=b"])
    assert "model.served_model_name='VALUE'" in message


def test_bare_hub_tokenizer_is_not_taken_for_a_host_path() -> None:
    """model.tokenizer=gpt2 (a hub id without an org) was refused in containers as 'a host path'."""
    assert plan_for(["deploy=docker", "model.tokenizer=gpt2"]).engine["tokenizer"] == "gpt2"
    assert_refused(["deploy=k8s"], {"model.tokenizer": "/srv/tokenizer"}, "model.tokenizer")
    assert plan_for(["deploy.cuda_visible_devices=''"]).cfg.deploy.cuda_visible_devices == ""  # no GPU: kept
