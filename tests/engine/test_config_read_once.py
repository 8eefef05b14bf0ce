"""resolve_model_config reads config.json once: its raw fields (checked before transformers builds the
config, and for the sizes transformers would default) and transformers' AutoConfig come from one read
of ours (it was json.load-ed twice)."""
from __future__ import annotations

import builtins
import os

import pytest

import engine.model_config
from engine.config import EngineConfig
from engine.model_config import resolve_model_config


def test_config_json_opened_once_by_the_model_config(tiny_llama: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []

    def counting_open(file, *args, **kwargs):
        opened.append(os.path.basename(str(file)))
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(engine.model_config, "open", counting_open, raising=False)  # this module's reads only
    resolve_model_config(EngineConfig(model=tiny_llama), None)
    assert opened.count("config.json") == 1, opened
    assert opened.count("generation_config.json") == 1, opened
