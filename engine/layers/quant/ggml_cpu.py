"""ggml block matmuls: the AVX2 kernel in ggml_cpu.c (built with the system C compiler at first use,
cached per source hash) and a torch fallback that dequantizes the blocks (GPU, or no compiler).

Block layouts (32 weights each): Q4_0 = f16 d, 16 B nibbles (d*(q-8)); Q4_1 = f16 d, f16 m, 16 B
nibbles (d*q+m); Q8_0 = f16 d, 32 int8 (d*q). Low nibbles hold weights 0-15, high 16-31.
K-quant super-blocks (256 weights): Q4_K = f16 d, f16 dmin, 12 B of 6-bit scales and mins for 8
sub-blocks of 32, 128 B nibbles (d*sc*q - dmin*m); Q5_K the same plus 32 B of fifth bits; Q6_K = 128 B low
nibbles, 64 B high 2-bit pairs, 16 int8 scales (sub-blocks of 16), f16 d (d*sc*(q-32)).
"""
from __future__ import annotations

import ctypes
import os

import torch

from gantry_kernels.cpu_native import NativeLibrary

GGML_Q4_0, GGML_Q4_1, GGML_Q8_0, GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 2, 3, 8, 12, 13, 14
K_QUANTS = (GGML_Q4_K, GGML_Q5_K, GGML_Q6_K)
# the types kept in blocks: bytes a block (32 weights; the K-quants' super-blocks 256)
BLOCK_BYTES = {GGML_Q4_0: 18, GGML_Q4_1: 20, GGML_Q8_0: 34, GGML_Q4_K: 144, GGML_Q5_K: 176, GGML_Q6_K: 210}
# Above this many activation rows, dequantizing the tensor once and calling BLAS beats the
# in-register kernel, which dequantizes every block once per 8 rows.
GEMM_MAX_ROWS = 128
# Multiply-adds per thread below which one thread is faster than waking another (~30 us of Q4 work:
# a passive OpenMP thread wakes in ~10 us; at 1 << 21 every decode matmul of SmolLM2 ran on one thread).
_WORK_PER_THREAD = 1 << 17
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ggml_cpu.c")


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ggml_gemm.argtypes = [ctypes.c_int, ptr, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.ggml_dequant.argtypes = [ctypes.c_int, ptr, i64, ptr, i64, ptr, ctypes.c_int]


NATIVE = NativeLibrary(_SOURCE, _bind)  # None without AVX2 or a compiler: the torch fallback runs
cpu_kernel = NATIVE.get  # the built kernel library, or None where it cannot run here


def row_bytes(ggml_type: int, k: int) -> int:
    """Bytes of one row of k weights of a kept type."""
    return k // (256 if ggml_type in K_QUANTS else 32) * BLOCK_BYTES[ggml_type]


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [..., 12] -> the 6-bit scales and mins of 8 sub-blocks, float32 [..., 8] each (gguf's get_scale_min)."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _dequant_k_torch(blocks: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    """float32 [rows, k] from K-quant super-blocks, gguf.dequantize's arithmetic and order."""
    rows = blocks.shape[0]
    b = blocks.reshape(rows, k // 256, BLOCK_BYTES[ggml_type])  # [rows, num_super, block_bytes]
    if ggml_type == GGML_Q6_K:
        ql = b[..., :128].reshape(rows, -1, 2, 1, 64)  # [.., half, 1, 64]
        ql = torch.cat([ql & 0x0F, ql >> 4], dim=-2).reshape(rows, -1, 256)  # (half, nibble, i)
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32)
        qh = torch.cat([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=-2).reshape(rows, -1, 256)
        q = ((ql | (qh << 4)).to(torch.int8) - 32).float().reshape(rows, -1, 16, 16)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()  # [rows, num_super, 16]
        d = b[..., 208:210].contiguous().view(torch.float16).float()  # [rows, num_super, 1]
        return ((d * sc)[..., None] * q).reshape(rows, k)
    d = b[..., 0:2].contiguous().view(torch.float16).float()  # [rows, num_super, 1]
    dmin = b[..., 2:4].contiguous().view(torch.float16).float()
    sc, mn = _scale_min_k4(b[..., 4:16])  # [rows, num_super, 8]
    qs = b[..., -128:].reshape(rows, -1, 4, 1, 32)  # 4 x 32 bytes, low nibbles then high: sub-blocks 2j, 2j + 1
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-2).reshape(rows, -1, 8, 32)
    if ggml_type == GGML_Q5_K:
        qh = b[..., 16:48].reshape(rows, -1, 1, 32)
        q = q | (torch.cat([(qh >> s) & 1 for s in range(8)], dim=-2) << 4)  # bit s of qh[i]: sub-block s
    return ((d * sc)[..., None] * q.float() - (dmin * mn)[..., None]).reshape(rows, k)


def _dequant_torch(blocks: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    """float32 [rows, k] from uint8 [rows, row_bytes(ggml_type, k)], with gguf.dequantize's arithmetic."""
    if ggml_type in K_QUANTS:
        return _dequant_k_torch(blocks, ggml_type, k)
    b = blocks.reshape(blocks.shape[0], k // 32, BLOCK_BYTES[ggml_type])  # [rows, num_blocks, block_bytes]
    d = b[..., :2].contiguous().view(torch.float16).float()  # [rows, num_blocks, 1]
    if ggml_type == GGML_Q8_0:
        q = b[..., 2:].contiguous().view(torch.int8).float()  # [rows, num_blocks, 32]
        return (d * q).reshape(-1, k)
    qs = b[..., -16:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # [rows, num_blocks, 32]
    if ggml_type == GGML_Q4_0:
        return (d * (q - 8)).reshape(-1, k)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    return (d * q + m).reshape(-1, k)


def dequantize_rows(blocks: torch.Tensor, ggml_type: int, k: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [len(rows), k] (all rows when rows is None) of a block tensor uint8 [n, row_bytes]."""
    lib = cpu_kernel() if blocks.device.type == "cpu" else None
    if lib is None:
        return _dequant_torch(blocks if rows is None else blocks[rows], ggml_type, k)
    assert blocks.is_contiguous()
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    num_rows = blocks.shape[0] if rows is None else rows.numel()
    out = torch.empty(num_rows, k, dtype=torch.float32)
    num_threads = min(torch.get_num_threads(), max(1, num_rows * k // _WORK_PER_THREAD))
    lib.ggml_dequant(ggml_type, blocks.data_ptr(), k, None if rows is None else rows.data_ptr(), num_rows,
                     out.data_ptr(), num_threads)
    return out


def ggml_linear(x: torch.Tensor, blocks: torch.Tensor, ggml_type: int, k: int) -> torch.Tensor:
    """x [num_tokens, k] @ W^T -> [num_tokens, n] for W given as blocks uint8 [n, row_bytes(ggml_type, k)]."""
    if x.is_cuda:
        from gantry_kernels.ggml_gemv import GEMV_TYPES, GGML_GEMV_MAX_M, ggml_gemv  # Triton: imported where it runs
        if 0 < x.shape[0] <= GGML_GEMV_MAX_M and ggml_type in GEMV_TYPES:  # decode: dequantized in registers
            return ggml_gemv(x, blocks, ggml_type, k)
    lib = cpu_kernel() if not x.is_cuda and x.dtype == torch.float32 else None
    m, n = x.shape[0], blocks.shape[0]
    if lib is None or m > GEMM_MAX_ROWS:
        return torch.nn.functional.linear(x, dequantize_rows(blocks, ggml_type, k).to(x.dtype))
    x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    num_threads = min(torch.get_num_threads(), max(1, m * n * k // _WORK_PER_THREAD))
    lib.ggml_gemm(ggml_type, blocks.data_ptr(), n, k, x.data_ptr(), m, y.data_ptr(), num_threads)
    return y
