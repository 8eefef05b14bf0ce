"""Typed user-facing errors: each names the parameter, file or rank at fault."""
from __future__ import annotations

from engine.config import ConfigError
from engine.sampling_params import SamplingParamsError


class RequestError(ValueError):
    """A request the engine cannot take (HTTP 400); `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


class ModelLoadError(RuntimeError):
    """Weights or model files are missing, corrupt or of an unsupported architecture."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture no model in engine/models implements."""


class RankFailedError(RuntimeError):
    """A peer rank died or stopped answering."""


__all__ = [
    "ConfigError",
    "SamplingParamsError",
    "RequestError",
    "ModelLoadError",
    "UnsupportedArchitectureError",
    "RankFailedError",
]
