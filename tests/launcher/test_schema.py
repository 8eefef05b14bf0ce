"""The launcher's engine options against the engine's own EngineConfig: a field added, renamed or
re-typed on one side fails here, naming what the other side (launcher/schema.py, conf/) lacks."""
from __future__ import annotations

import dataclasses
import typing

import yaml

from engine.config import EngineConfig
from launcher.plan import _ENGINE_KEYS
from launcher.schema import EngineOptions
from tests.launcher.conftest import CONF_DIR


def _defaults(cls: type) -> dict[str, object]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_every_engine_field_has_a_launcher_key() -> None:
    """EngineConfig = EngineOptions (engine.*) + the fields set from model.* and parallel.*."""
    engine = {f.name for f in dataclasses.fields(EngineConfig)}
    launcher = {f.name for f in dataclasses.fields(EngineOptions)} | set(_ENGINE_KEYS)
    assert not engine - launcher, f"EngineConfig fields with no launcher key (add them to EngineOptions in" \
                                  f" launcher/schema.py and conf/engine/default.yaml): {sorted(engine - launcher)}"
    assert not launcher - engine, f"launcher keys EngineConfig no longer has: {sorted(launcher - engine)}"


def test_engine_options_have_the_engines_types_and_defaults() -> None:
    engine_types, launcher_types = typing.get_type_hints(EngineConfig), typing.get_type_hints(EngineOptions)
    engine_defaults, launcher_defaults = _defaults(EngineConfig), _defaults(EngineOptions)
    for name in launcher_types:
        assert launcher_types[name] == engine_types[name], f"engine.{name}: {launcher_types[name]} vs {engine_types[name]}"
        if name == "kv_cache_memory_gib":
            continue  # the same None, read differently on CPU by the engine: nothing to compare
        assert launcher_defaults[name] == engine_defaults[name], (
            f"engine.{name}: launcher default {launcher_defaults[name]!r}, EngineConfig's {engine_defaults[name]!r}")


def test_conf_engine_default_matches_the_schema() -> None:
    """conf/engine/default.yaml spells out defaults: each must be a schema field with the engine's default."""
    with open(CONF_DIR / "engine" / "default.yaml", encoding="utf-8") as f:
        conf = yaml.safe_load(f)
    engine_defaults = _defaults(EngineConfig)
    unknown = set(conf) - {f.name for f in dataclasses.fields(EngineOptions)}
    assert not unknown, f"conf/engine/default.yaml keys EngineOptions lacks: {sorted(unknown)}"
    differ = {k: (v, engine_defaults[k]) for k, v in conf.items() if v != engine_defaults[k]}
    assert not differ, f"conf/engine/default.yaml vs EngineConfig defaults (yaml, engine): {differ}"
