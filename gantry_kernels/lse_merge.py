"""Attention outputs over disjoint key sets merged into one, by log-sum-exp: cuDNN's normalised outputs (any
layout, read where cuDNN wrote them) and, optionally, a Triton kernel's unnormalised split partials.

Each normalised source is o [num_heads, rows, D] (strided) with its lse [num_heads, rows] (natural log); its
weight for a row is exp(lse). A split partial (m in log2, l, acc [.., D] as decode_attention.split_partials
lays them out) weighs 2^m and sums to acc / l. One pass over every source: no float32 copy of cuDNN's
outputs is written first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gantry_kernels.decode_attention import LOG2E

_LOG2E = tl.constexpr(LOG2E)
META = 6  # per source: o address, lse address, o head stride, o row stride, lse head stride, lse row stride


@triton.jit(do_not_specialize=["n", "num_sources", "num_splits"])  # counts vary per chunk: no compile mid-serve
def _merge_kernel(
    out_ptr,  # [n, num_heads, D]
    meta_ptr,  # [num_sources, META] int64; addresses already at each source's first row
    part_m_ptr, part_l_ptr, part_acc_ptr,  # [n, num_heads, num_splits] (+ [D]) float32, or stand-ins
    n, num_sources, num_splits, stride_out_t, stride_out_h,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    ok = rows < n
    dims = tl.arange(0, HEAD_DIM)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], tl.float32)
    for s in range(num_sources):
        meta = meta_ptr + s * 6
        o_ptr = tl.load(meta).to(tl.pointer_type(out_ptr.dtype.element_ty))
        lse_ptr = tl.load(meta + 1).to(tl.pointer_type(tl.float32))
        lse = tl.load(lse_ptr + head * tl.load(meta + 4) + rows * tl.load(meta + 5), mask=ok, other=0.0) * _LOG2E
        o = tl.load(o_ptr + head * tl.load(meta + 2) + rows[:, None] * tl.load(meta + 3) + dims[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lse)
        keep = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * keep[:, None] + o * w[:, None]
        l = l * keep + w
        m = m_new
    for s in range(num_splits):
        part = (rows.to(tl.int64) * tl.num_programs(1) + head) * num_splits + s
        ms = tl.load(part_m_ptr + part, mask=ok, other=float("-inf"))
        used = ok & (ms > float("-inf"))  # an empty split wrote m = -inf alone: its l and acc are not read
        ls = tl.load(part_l_ptr + part, mask=used, other=0.0)
        accs = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
        m_new = tl.maximum(m, ms)
        keep = tl.exp2(m - m_new)
        w = tl.where(used, tl.exp2(ms - m_new), 0.0)
        acc = acc * keep[:, None] + accs * w[:, None]
        l = l * keep + ls * w
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out_t + head * stride_out_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


def merge_normalized(
    out: torch.Tensor,  # [n, num_heads, D], written
    sources: list[tuple[torch.Tensor, torch.Tensor]],  # (o [num_heads, >= n, D], lse [num_heads, >= n]), >= 1
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # (m, l, acc), [n, num_heads, S]
) -> None:
    """out = the softmax-weighted sum of every source's first n rows (and the split partials'), per head."""
    n, num_heads, head_dim = out.shape
    assert sources and all(o.dtype == out.dtype and o.stride(2) == 1 and lse.dtype == torch.float32
                           for o, lse in sources)
    meta = torch.tensor([[o.data_ptr(), lse.data_ptr(), o.stride(0), o.stride(1), lse.stride(0), lse.stride(1)]
                         for o, lse in sources], dtype=torch.int64).to(out.device, non_blocking=True)
    if partials is None:  # float32 stand-ins, never read: the same compiled variant as with partials
        partials = (torch.empty(1, dtype=torch.float32, device=out.device),) * 3
        num_splits = 0
    else:
        num_splits = partials[0].shape[-1]
    part_m, part_l, part_acc = partials
    block_t = 16
    _merge_kernel[(triton.cdiv(n, block_t), num_heads)](
        out, meta, part_m, part_l, part_acc, n, len(sources), num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_T=block_t)
