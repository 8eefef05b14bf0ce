"""engine.trust_remote_code (vLLM's --trust-remote-code): the launcher key reaches engine.yaml and the
EngineConfig engine.serve reads from it (test_schema.py checks its type and default against EngineConfig's)."""
from __future__ import annotations

from pathlib import Path

from engine.config import load_config_file
from tests.launcher.conftest import render


def test_trust_remote_code_reaches_the_engine(tmp_path: Path) -> None:
    for value in (True, False):
        files = render(["deploy=docker", "model=tiny-llama", "engine=cpu", f"engine.trust_remote_code={value}"])
        path = tmp_path / "engine.yaml"
        path.write_text(files["engine.yaml"])
        engine, _ = load_config_file(str(path))
        assert engine.trust_remote_code is value

