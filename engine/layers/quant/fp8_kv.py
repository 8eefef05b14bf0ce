"""FP8 KV cache (kv_cache_dtype fp8 / fp8_e4m3): pages in float8_e4m3fn holding value / scale, with
one k_scale and one v_scale per attention layer, read from the checkpoint (`self_attn.k_scale`,
`self_attn.v_scale`, or one `self_attn.kv_scale` for both) or 1.0 with a log line.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from engine.layers.quant.fp8 import whole
from engine.layers.quant.fp8_support import FP8_DTYPE, check_fp8_supported

logger = logging.getLogger("gantry.engine")

_SCALE_SUFFIXES = {".self_attn.k_scale": "k", ".self_attn.v_scale": "v", ".self_attn.kv_scale": "kv"}


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The pages' dtype: the model's for auto, float8_e4m3fn for fp8 / fp8_e4m3 where FP8 runs."""
    if kv_cache_dtype == "auto":
        return model_dtype
    check_fp8_supported(device, "kv_cache_dtype")
    return FP8_DTYPE


def take_kv_scale(model: nn.Module, name: str, loaded: Any) -> bool:
    """Keep a checkpoint's per-layer KV scale on its attention layer; False: `name` is not one."""
    for suffix, which in _SCALE_SUFFIXES.items():
        if name.endswith(suffix):
            attn = model.get_submodule(name[: -len(suffix)] + ".self_attn.attn")
            value = float(whole(loaded).float().reshape(-1).max())
            scales = getattr(attn, "checkpoint_kv_scales", {})
            scales.update({"k": value, "v": value} if which == "kv" else {which: value})
            attn.checkpoint_kv_scales = scales
            return True
    return False


def bind_kv_scales(attn_layers: list[nn.Module], kv_cache_dtype: torch.dtype) -> None:
    """Set each layer's k_scale / v_scale for its pages: the checkpoint's for FP8 pages, else 1.0."""
    missing = 0
    for attn in attn_layers:
        scales = getattr(attn, "checkpoint_kv_scales", {}) if kv_cache_dtype == FP8_DTYPE else {}
        attn.k_scale, attn.v_scale = scales.get("k", 1.0), scales.get("v", 1.0)
        missing += len(scales) < 2
    if kv_cache_dtype != FP8_DTYPE:
        return
    if missing:
        logger.info("kv_cache_dtype fp8: %d of %d layers have no k_scale/v_scale in the checkpoint: scale 1.0 "
                    "(values beyond +-448 saturate)", missing, len(attn_layers))
    else:
        logger.info("kv_cache_dtype fp8: k_scale/v_scale of every layer from the checkpoint")
