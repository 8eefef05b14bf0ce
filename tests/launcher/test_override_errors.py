"""Command-line overrides Hydra cannot use: status 2 like every invalid config, naming the key,
nothing rendered. Hydra exited 1 for a value of the wrong type or an unknown option, and for an
unquoted '=' in a value (a LoRA path) printed "mismatched input '=' expecting <EOF>" naming no key
(found by fuzzing the launcher)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.launcher.conftest import job_dir_of, run_cli

BAD = {
    "equals_in_value": ("+model.lora_modules.sql=/data/lora/a=b", "+model.lora_modules.sql"),
    "blank_in_value": ("deploy.image=gantry latest", "deploy.image"),
    "string_for_int": ("parallel.tensor_parallel_size=abc", "parallel.tensor_parallel_size"),
    "float_for_int": ("server.port=80.5", "server.port"),
    "unknown_option": ("model=no-such-model", "model/no-such-model"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_override_exits_2_naming_the_key(case: str, tmp_path: Path) -> None:
    override, key = BAD[case]
    out = tmp_path / "jobs"
    done = run_cli(["deploy=docker", override, f"output_dir={out}", "submit=false"], cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert key in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


def test_quoted_equals_in_a_value_is_kept(tmp_path: Path) -> None:
    lora = tmp_path / "lora=v1"
    lora.mkdir()
    done = run_cli(["deploy=docker", "engine.enable_lora=true", f"+model.lora_modules.sql='{lora}'",
                    f"output_dir={tmp_path / 'jobs'}", "submit=false"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{lora}:/adapters/0:ro" in (job_dir_of(done) / "run.sh").read_text()
