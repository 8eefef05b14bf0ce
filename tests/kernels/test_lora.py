"""LoRA shrink/expand: Triton SGMV (prefill segments) and BGMV (decode tokens) against reference.py,
with tokens of several adapters, of none (-1), ranks padded with zeros, and expand into a column slice."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels import reference
from kernels.lora import bgmv, sgmv

Check = Callable[[torch.Tensor, torch.Tensor], None]
# bf16 dots are wrong under the interpreter (triton 3.9): bf16 only on the GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _segments(lens: list[int], slots: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
