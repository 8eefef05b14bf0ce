"""The engine's CPU ops: gantry_kernels/cpu_attention.c where it applies (float32 tensors, an AVX2 CPU, a C
compiler), else gantry_kernels/reference.py, which stays the plain-torch oracle. One C call replaces the 5-40
torch ops of each (and the per-sequence Python loop of attention): a decode step on a small model is
made of these calls, so their count, not their arithmetic, set its time. GANTRY_CPU_NATIVE=0: torch only.
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

import torch

from gantry_kernels import reference
from gantry_kernels.cpu_native import NativeLibrary

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.c")
_F32 = torch.float32
# Multiply-adds below which one thread beats waking the others (about 0.05 ms of work).
_WORK_PER_THREAD = 1 << 18


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.paged_attention_f32.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64,
                                        f32, ptr, ctypes.c_int]
    lib.store_kv_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64]
    lib.rms_norm_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, f32]
    lib.rotary_f32.argtypes = [ptr, ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, ptr]
    lib.silu_and_mul_f32.argtypes = [ptr, ptr, i64, i64]


NATIVE = NativeLibrary(_SOURCE, _bind, switches=("GANTRY_CPU_NATIVE",))
_native = NATIVE.get


def _ok(*tensors: torch.Tensor) -> bool:
    if _native() is None:
        return False
    for t in tensors:  # a plain loop: this runs ~10 times per layer and step
        if t.dtype != _F32 or t.is_cuda:
            return False
    return True


def __getattr__(name: str) -> Any:  # everything without a C version: the reference's
    return getattr(reference, name)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """reference.store_kvcache; float32 pages written by the C loop."""
    if not (_ok(key, value, k_cache, v_cache) and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return reference.store_kvcache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    key, value = key.contiguous(), value.contiguous()  # [num_tokens, num_kv_heads, head_dim]
    slots = slot_mapping.to(torch.int64).contiguous()
    NATIVE.lib.store_kv_f32(key.data_ptr(), value.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                            slots.data_ptr(), key.shape[0], key.shape[1] * key.shape[2])


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    max_query_len: int | None = None, max_seq_len: int | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """reference.paged_attention (same arguments); float32 pages read in place, every sequence in one call."""
    if not (_ok(query, k_cache, v_cache) and k_cache.is_contiguous() and v_cache.is_contiguous()):
        return reference.paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                         max_query_len, max_seq_len, k_scale, v_scale)
    num_tokens, num_heads, head_dim = query.shape
    q = query.contiguous()  # [num_tokens, num_heads, head_dim]
    out = torch.empty_like(q)
    tables = block_tables.to(torch.int32).contiguous()  # [num_seqs, max_blocks]
    starts = query_start_loc.to(torch.int32).contiguous()  # [num_seqs + 1]
    lens = seq_lens.to(torch.int32).contiguous()  # [num_seqs]
    longest = max_seq_len if max_seq_len is not None else int(lens.max()) if lens.numel() else 0
    work = num_tokens * num_heads * head_dim * max(longest, 1)
    threads = min(torch.get_num_threads(), max(1, work // _WORK_PER_THREAD), num_tokens * num_heads)
    NATIVE.lib.paged_attention_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                                   tables.shape[1], starts.data_ptr(), lens.data_ptr(), lens.shape[0], num_tokens,
                                   num_heads, k_cache.shape[2], head_dim, k_cache.shape[1], scale, out.data_ptr(),
                                   max(threads, 1))
    return out


def decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float, max_seq_len: int | None = None, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    query_start_loc = torch.arange(seq_lens.shape[0] + 1, dtype=torch.int32)
    return paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                           max_seq_len=max_seq_len, k_scale=k_scale, v_scale=v_scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if not (_ok(x, weight) and x.is_contiguous() and weight.shape == x.shape[-1:] and weight.is_contiguous()):
        return reference.rms_norm(x, weight, eps)
    out = torch.empty_like(x)
    NATIVE.lib.rms_norm_f32(x.data_ptr(), None, None, weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                            x.shape[-1], eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual = x + residual (a new tensor: the caller's is not written); return (rms_norm(residual), residual)."""
    if not (_ok(x, residual, weight) and x.is_contiguous() and residual.shape == x.shape and residual.is_contiguous()
            and weight.shape == x.shape[-1:] and weight.is_contiguous()):
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    out, res = torch.empty_like(x), torch.empty_like(x)
    NATIVE.lib.rms_norm_f32(x.data_ptr(), residual.data_ptr(), res.data_ptr(), weight.data_ptr(), out.data_ptr(),
                            x.numel() // x.shape[-1], x.shape[-1], eps)
    return out, res


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.rotary_embedding; new contiguous q, k (the inputs may be views of the fused qkv)."""
    head_dim = query.shape[-1]
    if not (_ok(query, key, cos_sin_cache) and cos_sin_cache.shape[-1] == head_dim and cos_sin_cache.is_contiguous()
            and query.stride(-1) == 1 and key.stride(-1) == 1 and query.stride(1) == head_dim
            and key.stride(1) == head_dim):
        return reference.rotary_embedding(positions, query, key, cos_sin_cache)
    pos = positions.to(torch.int64).contiguous()
    q_out = torch.empty(query.shape, dtype=_F32)  # [num_tokens, num_heads, head_dim]
    k_out = torch.empty(key.shape, dtype=_F32)  # [num_tokens, num_kv_heads, head_dim]
    NATIVE.lib.rotary_f32(pos.data_ptr(), query.data_ptr(), query.stride(0), query.shape[1], key.data_ptr(),
                          key.stride(0), key.shape[1], cos_sin_cache.data_ptr(), head_dim, query.shape[0],
                          q_out.data_ptr(), k_out.data_ptr())
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if not (_ok(x) and x.is_contiguous()):
        return reference.silu_and_mul(x)
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=_F32)
    NATIVE.lib.silu_and_mul_f32(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], d)
    return out
