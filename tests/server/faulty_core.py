"""An engine core that fails on purpose, for the fault tests: built in the engine-core process
(create_app(core_factory=...) pickles this function by reference, so it lives in a module)."""
from __future__ import annotations

from typing import Any

from engine.config import ConfigError, EngineConfig
from engine.core_build import CoreBuild, build_engine_core

KILL_SEED = 4242  # step() itself raises while such a request is queued: a fault no request explains


def faulty_core(config: EngineConfig) -> CoreBuild:
    build = build_engine_core(config)
    core = build.core
    step_fn = core.step_fn

    def faulty_step_fn() -> Any:
        if any(r.params.seed == KILL_SEED for r in core.requests.values()):
            raise RuntimeError("injected fault that no request explains")
        return step_fn()

    core.step_fn = faulty_step_fn
    return build


def fail_at_once(config: EngineConfig) -> CoreBuild:
    raise ConfigError("max_model_len", "injected: refused before Sanic has finished starting")
