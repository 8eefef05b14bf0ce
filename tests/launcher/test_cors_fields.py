"""server.allowed_origins/allowed_methods/allowed_headers/allow_credentials (vLLM's CORS flags): the launcher
keys reach engine.yaml and the ServerConfig engine.serve reads from it; a bad value names its key."""
from __future__ import annotations

from pathlib import Path

from engine.config import load_config_file
from tests.launcher.conftest import assert_refused, render


def test_cors_fields_reach_the_server(tmp_path: Path) -> None:
    files = render(["deploy=docker", "model=tiny-llama", "engine=cpu", "server.allowed_origins=['https://app.example']",
                    "server.allowed_methods=[GET,POST]", "server.allow_credentials=true"])
    path = tmp_path / "engine.yaml"
    path.write_text(files["engine.yaml"])
    _, server = load_config_file(str(path))
    assert server.allowed_origins == ["https://app.example"] and server.allowed_methods == ["GET", "POST"]
    assert server.allowed_headers == ["*"] and server.allow_credentials is True


def test_bad_cors_value_names_the_key() -> None:
    assert_refused(["model=tiny-llama", "engine=cpu"], {"server.allowed_origins": [""]}, "server.allowed_origins")
