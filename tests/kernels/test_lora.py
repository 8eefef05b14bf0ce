"""LoRA shrink/expand: Triton SGMV (prefill segments) and BGMV (decode tokens) against reference.py,
with tokens of several adapters, of none (-1), ranks padded with zeros, and expand into a column slice;
lora_augment (augmented K's input [x, t masked to each token's slot]) and lora_mask_ (augmented N's t, masked in
place) against torch."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gantry_kernels import reference
from gantry_kernels.lora import bgmv, lora_augment, lora_mask_, sgmv

Check = Callable[[torch.Tensor, torch.Tensor], None]
# bf16 dots are wrong under the interpreter (triton 3.9): bf16 only on the GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _segments(lens: list[int], slots: list[int],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(seg_start [S + 1], seg_slot [S], token_slots [num_tokens]) int32 for segments of these lengths."""
    starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    token_slots = torch.repeat_interleave(torch.tensor(slots, dtype=torch.int32), torch.tensor(lens))
    return starts.to(device), torch.tensor(slots, dtype=torch.int32, device=device), token_slots.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,slots", [([1, 70, 5, 33], [2, -1, 0, 2]), ([17], [1]), ([3, 1, 1, 100], [0, 1, -1, 3])])
def test_sgmv_shrink_expand(assert_close: Check, device: torch.device, dtype: torch.dtype, lens: list[int],
                            slots: list[int]) -> None:
    num_slots, rank, hidden, out_features, offset = 4, 16, 96, 80, 24
    seg_start, seg_slot, token_slots = _segments(lens, slots, device)
    n = sum(lens)
    x = torch.randn(n, hidden, device=device).to(dtype)  # [num_tokens, hidden]
    a = (torch.randn(num_slots, rank, hidden, device=device) / hidden**0.5).to(dtype)  # [slots, rank, hidden]
    a[:, 12:] = 0  # a rank-12 adapter padded to the stack's rank
    b = torch.randn(num_slots, out_features, rank, device=device).to(dtype)  # [slots, out, rank]
    t = torch.zeros(n, rank, dtype=torch.float32, device=device)
    sgmv(x, a, t, seg_start, seg_slot, max(lens))
    t_ref = reference.lora_shrink(x, a, token_slots)
    assert_close(t, t_ref) if dtype == torch.float32 else assert_close(t.to(dtype), t_ref.to(dtype))
    y = torch.randn(n, offset + out_features + 8, device=device).to(dtype)  # the base layer's output
    y_ref = y.clone()
    sgmv(t_ref, b, y, seg_start, seg_slot, max(lens), offset=offset, add=True)
    reference.lora_expand(t_ref, b, token_slots, y_ref, offset)
    assert_close(y, y_ref)
    no_adapter = token_slots < 0
    assert torch.equal(y[no_adapter], y_ref[no_adapter])  # rows without an adapter untouched, bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
def test_bgmv_shrink_expand(assert_close: Check, device: torch.device, dtype: torch.dtype) -> None:
    num_slots, rank, hidden, out_features, offset = 3, 16, 200, 48, 16
    token_slots = torch.tensor([0, -1, 2, 2, 1, -1, 0, 1, 2], dtype=torch.int32, device=device)
    n = token_slots.shape[0]
    x = torch.randn(n, hidden, device=device).to(dtype)
    a = (torch.randn(num_slots, rank, hidden, device=device) / hidden**0.5).to(dtype)
    b = torch.randn(num_slots, out_features, rank, device=device).to(dtype)
    t = torch.zeros(n, rank, dtype=torch.float32, device=device)
    bgmv(x, a, t, token_slots)
    t_ref = reference.lora_shrink(x, a, token_slots)
    assert_close(t, t_ref) if dtype == torch.float32 else assert_close(t.to(dtype), t_ref.to(dtype))
    y = torch.randn(n, offset + out_features, device=device).to(dtype)
    y_ref = y.clone()
    bgmv(t_ref, b, y, token_slots, offset=offset, add=True)
    reference.lora_expand(t_ref, b, token_slots, y_ref, offset)
    assert_close(y, y_ref)
    assert torch.equal(y[token_slots < 0], y_ref[token_slots < 0])


def test_bgmv_static_buffer_longer_than_batch(assert_close: Check, device: torch.device) -> None:
    """CUDA graphs keep the slots in a static buffer longer than the batch: only the first rows are read."""
    token_slots = torch.tensor([1, 0, -1, 5, 5, 5], dtype=torch.int32, device=device)  # tail: stale slots
    x = torch.randn(3, 32, device=device)
    a = torch.randn(2, 16, 32, device=device)
    t = torch.zeros(3, 16, device=device)
    bgmv(x, a, t, token_slots)
    assert_close(t, reference.lora_shrink(x, a, token_slots))


def grouped(token_slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, seg_start, seg_slot): token rows grouped by adapter, one segment per slot (the engine's layout)."""
    slots = token_slots.cpu()
    keep = (slots >= 0).nonzero().squeeze(1)
    perm = keep[torch.argsort(slots[keep], stable=True)].to(torch.int32)
    counts = torch.bincount(slots[keep].long(), minlength=num_slots)
    seg_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    dev = token_slots.device
    return perm.to(dev), seg_start.to(dev), torch.arange(num_slots, dtype=torch.int32, device=dev)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_sgmv_grouped_by_adapter(assert_close: Check, device: torch.device, dtype: torch.dtype, split_k: int) -> None:
    """Tokens of one adapter scattered through the batch (decode), read through perm; split-K shrink."""
    num_slots, rank, hidden, out_features, offset = 4, 16, 160, 40, 8
    token_slots = torch.randint(-1, num_slots, (37,), dtype=torch.int32, device=device)
    token_slots[:4] = torch.tensor([3, -1, 3, 0])  # an empty slot (2 may be), a no-adapter token
    perm, seg_start, seg_slot = grouped(token_slots, num_slots)
    n = token_slots.shape[0]
    x = torch.randn(n, hidden, device=device).to(dtype)
    a = (torch.randn(num_slots, rank, hidden, device=device) / hidden**0.5).to(dtype)
    b = torch.randn(num_slots, out_features, rank, device=device).to(dtype)
    t = torch.zeros(n, rank, dtype=torch.float32, device=device)
    sgmv(x, a, t, seg_start, seg_slot, n, perm=perm, add=split_k > 1, split_k=split_k)
    t_ref = reference.lora_shrink(x, a, token_slots)
    assert_close(t, t_ref) if dtype == torch.float32 else assert_close(t.to(dtype), t_ref.to(dtype))
    y = torch.randn(n, offset + out_features, device=device).to(dtype)
    y_ref = y.clone()
    sgmv(t_ref, b, y, seg_start, seg_slot, n, offset=offset, add=True, perm=perm)
    reference.lora_expand(t_ref, b, token_slots, y_ref, offset)
    assert_close(y, y_ref)
    assert torch.equal(y[token_slots < 0], y_ref[token_slots < 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgmv_fused_slices_expand(assert_close: Check, device: torch.device, dtype: torch.dtype) -> None:
    """q, k and v expanded in one launch: each output tile reads its own slice's rank columns (x_col)."""
    num_slots, rank, sizes, block_n = 3, 16, [64, 32, 32], 32
    token_slots = torch.tensor([2, 0, -1, 2, 1, 1, 0, 2, -1, 2], dtype=torch.int32, device=device)
    perm, seg_start, seg_slot = grouped(token_slots, num_slots)
    n = token_slots.shape[0]
    t = torch.randn(n, len(sizes) * rank, device=device)  # the shrink's output, one rank block per slice
    b_all = torch.randn(num_slots, sum(sizes), rank, device=device).to(dtype)
    cols = [i * rank for i, size in enumerate(sizes) for _ in range(size // block_n)]
    y = torch.randn(n, sum(sizes), device=device).to(dtype)
    y_ref = y.clone()
    sgmv(t, b_all, y, seg_start, seg_slot, n, add=True, perm=perm, block_n=block_n,
         x_col=torch.tensor(cols, dtype=torch.int32, device=device))
    offset = 0
    for i, size in enumerate(sizes):
        reference.lora_expand(t[:, i * rank : (i + 1) * rank], b_all[:, offset : offset + size], token_slots, y_ref,
                              offset)
        offset += size
    assert_close(y, y_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_augment(device: torch.device, dtype: torch.dtype) -> None:
    """[x, t] with each token's own slot's columns of t kept, the rest 0; the slots buffer is longer than the
    batch (CUDA graphs' static buffer) and K + T spans several column blocks."""
    num_slots, cols_per_slot, k = 4, 48, 1500
    token_slots = torch.tensor([2, -1, 0, 3, 3, 1, -1, 2, 5, 5], dtype=torch.int32, device=device)  # tail: stale
    n = 8
    x = torch.randn(n, k, device=device).to(dtype)
    t = torch.randn(n, num_slots * cols_per_slot, device=device).to(dtype)
    out = torch.full((n, k + t.shape[1]), float("nan"), device=device, dtype=dtype)  # every element written
    lora_augment(x, t, token_slots, cols_per_slot, out)
    col_slot = torch.arange(t.shape[1], device=device) // cols_per_slot
    want = torch.cat([x, t * (col_slot[None, :] == token_slots[:n, None])], dim=1)
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_mask_in_place(device: torch.device, dtype: torch.dtype) -> None:
    """t, the tail of the augmented-N GEMM's output (strided rows), keeps each token's own slot's columns and
    zeroes the rest; the GEMM's own columns before it are untouched; the slots buffer is longer than the batch."""
    num_slots, cols_per_slot, out = 4, 48, 40
    token_slots = torch.tensor([2, -1, 0, 3, 3, 1, -1, 2, 5, 5], dtype=torch.int32, device=device)  # tail: stale
    n = 8
    yt = torch.randn(n, out + num_slots * cols_per_slot, device=device).to(dtype)
    want = yt.clone()
    col_slot = torch.arange(num_slots * cols_per_slot, device=device) // cols_per_slot
    want[:, out:] *= col_slot[None, :] == token_slots[:n, None]
    t = yt[:, out:]
    assert lora_mask_(t, token_slots, cols_per_slot) is t
    assert torch.equal(yt, want)


def test_sgmv_split_k_shrink_into_step_buffer(assert_close: Check, device: torch.device) -> None:
    """Decode's shrink adds into its own columns of the step's zeroed float32 buffer (strided rows), leaving
    the other layers' columns as they were."""
    num_slots, rank, hidden, col = 3, 32, 256, 16
    token_slots = torch.tensor([1, -1, 0, 2, 2, 1, 0], dtype=torch.int32, device=device)
    perm, seg_start, seg_slot = grouped(token_slots, num_slots)
    n = token_slots.shape[0]
    x = torch.randn(n, hidden, device=device)
    a = torch.randn(num_slots, rank, hidden, device=device) / hidden**0.5
    step = torch.zeros(n + 2, col + rank + 8, device=device)  # [>= num_tokens, every layer's columns]
    step[:, :col] = 7.0
    step[:, col + rank :] = 5.0
    sgmv(x, a, step[:n, col : col + rank], seg_start, seg_slot, n, add=True, perm=perm, split_k=4)
    assert_close(step[:n, col : col + rank], reference.lora_shrink(x, a, token_slots))
    assert (step[:, :col] == 7.0).all() and (step[:, col + rank :] == 5.0).all() and not step[n:, col:col + rank].any()
