"""The Triton kernels under reference.py's names: the GPU twin of kernels.reference."""
from __future__ import annotations

from kernels.activation import silu_and_mul
from kernels.decode_attention import decode_attention
from kernels.kv_store import store_kvcache
from kernels.norm import fused_add_rms_norm, rms_norm
from kernels.paged_attention import paged_attention
from kernels.rotary import rotary_embedding

__all__ = [
    "decode_attention",
    "fused_add_rms_norm",
    "paged_attention",
    "rms_norm",
    "rotary_embedding",
    "silu_and_mul",
    "store_kvcache",
]
