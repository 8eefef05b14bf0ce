"""Where FP8 (e4m3) runs: GPUs of compute capability >= 8.9 (Ada, Hopper), or CPU with the emulation
switch GANTRY_FP8_EMULATE=1 (tests only: FP8 values and scales exactly as on the GPU, matmuls in float32).
Elsewhere a ConfigError names the field that asked for FP8 (`quantization` or `kv_cache_dtype`).
"""
from __future__ import annotations

import logging
import os

import torch

from engine.config import ConfigError

logger = logging.getLogger("gantry.engine")

EMULATE_ENV = "GANTRY_FP8_EMULATE"
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448: e4m3fn has no infinity, values beyond saturate here
MIN_CAPABILITY = (8, 9)


def emulation_enabled() -> bool:
    return os.environ.get(EMULATE_ENV) == "1"


def check_fp8_supported(device: torch.device, field: str) -> str:
    """'native' or 'emulated' for FP8 on `device`; ConfigError naming `field` where it cannot run."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise ConfigError(field, f"FP8 needs a GPU of compute capability >= 8.9 (Ada, Hopper); "
                              f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
        return "native"
    if not emulation_enabled():
        raise ConfigError(field, f"FP8 runs on GPUs of compute capability >= 8.9 only, not on {device.type} "
                          f"(set {EMULATE_ENV}=1 for the emulated CPU path, meant for tests)")
    logger.info("%s: FP8 emulated on %s (%s=1): FP8 values and scales as on a GPU, float32 matmuls; "
                "for tests, not speed", field, device.type, EMULATE_ENV)
    return "emulated"
