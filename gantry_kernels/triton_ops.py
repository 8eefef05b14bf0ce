"""The Triton kernels under reference.py's names: the GPU twin of gantry_kernels.reference."""
from __future__ import annotations

from gantry_kernels.activation import silu_and_mul
from gantry_kernels.decode_attention import decode_attention
from gantry_kernels.kv_store import store_kvcache
from gantry_kernels.norm import fused_add_rms_norm, rms_norm
from gantry_kernels.paged_attention import paged_attention
from gantry_kernels.rotary import rotary_embedding

__all__ = [
    "decode_attention",
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kvcache",
]
