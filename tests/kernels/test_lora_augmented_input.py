"""Augmented K's [x, t] written in place (engine/lora/augmented.py's input_view + complete): the Triton RMSNorm,
fused add + RMSNorm and SiLU-and-mul with out= a strided view (the x columns of [x, t]) against themselves
without it, lora_mask_slots against torch, and qkv/gate_up/down on that path against the copying one (the
shrink's mm into the tail); again on the GPU at Qwen2-7B's shapes."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels.activation import silu_and_mul
from kernels.lora import lora_mask_slots
from kernels.norm import fused_add_rms_norm, rms_norm

Check = Callable[[torch.Tensor, torch.Tensor], None]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check_ops_into_view(n: int, hidden: int, inter: int, tail: int, dtype: torch.dtype, device: torch.device) -> None:
    """Each op into the head of a [n, width + tail] buffer: the same bits as its own output, the tail untouched."""
    x = (3 * torch.randn(n, hidden, device=device)).to(dtype)
    residual = torch.randn(n, hidden, device=device).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    gate_up = (2 * torch.randn(n, 2 * inter, device=device)).to(dtype)
    for width, fill in ((hidden, lambda o: rms_norm(x, weight, 1e-6, out=o)),
                        (hidden, lambda o: fused_add_rms_norm(x, residual, weight, 1e-6, out=o)[0]),
                        (inter, lambda o: silu_and_mul(gate_up, out=o))):
        buf = torch.full((n, width + tail), 7.0, device=device, dtype=dtype)
        out = buf[:, :width]
        assert fill(out) is out  # returned as is: the linear recognises this very tensor
        assert torch.equal(out, fill(None))
        assert (buf[:, width:] == 7.0).all()
    _, new_residual = fused_add_rms_norm(x, residual, weight, 1e-6, out=torch.empty(n, hidden + tail, device=device,
                                                                                    dtype=dtype)[:, :hidden])
    assert torch.equal(new_residual, fused_add_rms_norm(x, residual, weight, 1e-6)[1])


def _check_mask(n: int, k: int, num_slots: int, cols_per_slot: int, dtype: torch.dtype, device: torch.device) -> None:
    token_slots = torch.randint(-1, num_slots, (n + 3,), dtype=torch.int32, device=device)  # tail: stale slots
    token_slots[n:] = num_slots + 1
    buf = torch.randn(n, k + num_slots * cols_per_slot, device=device).to(dtype)
    want = buf.clone()
    col_slot = torch.arange(num_slots * cols_per_slot, device=device) // cols_per_slot
    want[:, k:] *= col_slot[None, :] == token_slots[:n, None]
    lora_mask_slots(buf[:, k:], token_slots, cols_per_slot)
    assert torch.equal(buf, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hidden,inter", [(7, 64, 96), (3, 1000, 1500)])
def test_ops_into_strided_out(device: torch.device, dtype: torch.dtype, n: int, hidden: int, inter: int) -> None:
    _check_ops_into_view(n, hidden, inter, 48, dtype, device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,num_slots,cols_per_slot", [(9, 40, 4, 48), (5, 8, 8, 16), (2, 16, 3, 700)])
def test_lora_mask_slots(device: torch.device, dtype: torch.dtype, n: int, k: int, num_slots: int,
                         cols_per_slot: int) -> None:
    """Only the other slots' columns of t zeroed, x's columns and the own slot's kept; slot -1 all zero."""
    _check_mask(n, k, num_slots, cols_per_slot, dtype, device)


def _check_layers(num_tokens: int, hidden: int, q: int, kv: int, inter: int, slots: int, rank: int,
                  dtype: torch.dtype, device: torch.device, check: Check) -> None:
    """qkv, gate_up and down on the written path (x into input_view, complete) against the copying path (torch.mm,
    lora_augment): the shrink's mm went straight into the tail (the same storage, values as a contiguous mm)."""
    from torch import nn

    from engine.lora.augmented import AugmentedLoRALinear
    from engine.lora.layers import LoRASlice
    from engine.lora.punica import LoRABatch, lora_batch

    token_slots = torch.randint(-1, slots, (num_tokens,), dtype=torch.int32, device=device)
    batch = LoRABatch(token_slots, None, None, None, None, True)
    for slices, in_features in (([("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)], hidden),
                                ([("gate_proj", 0, inter), ("up_proj", inter, inter)], hidden),
                                ([("down_proj", 0, hidden)], inter)):
        layer = nn.Module()
        out_features = sum(size for _, _, size in slices)
        layer.weight = nn.Parameter((torch.randn(out_features, in_features, device=device) * 0.05).to(dtype),
                                    requires_grad=False)
        aug = AugmentedLoRALinear([LoRASlice(m, off, size, 0) for m, off, size in slices], in_features, 0, False,
                                  slots, rank, layer)
        aug.a_all.normal_(std=0.05)
        aug.w_aug[:, in_features:].normal_(std=0.05)
        x = torch.randn(num_tokens, in_features, device=device).to(dtype)
        with torch.inference_mode(), lora_batch(batch):  # as the model runner
            view = aug.input_view(num_tokens)
            buf = view.lora_augmented_buffer
            tail_ptr = buf[:, in_features:].data_ptr()
            view.copy_(x)
            got = aug.linear(batch, view, None)
            want = aug.linear(batch, x, None)
            want_aug = aug.augment(batch, x)
        assert buf[:, in_features:].data_ptr() == tail_ptr and torch.equal(buf[:, :in_features], x)
        check(buf, want_aug)
        check(got, want)


def test_layers_written_path(assert_close: Check, device: torch.device) -> None:
    _check_layers(11, 64, 64, 32, 96, 3, 16, torch.float32, device, assert_close)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [256, 8192])
def test_augmented_input_gpu_model_shapes(assert_close: Check, num_tokens: int) -> None:
    """Qwen2-7B (hidden 3584, 28/4 heads of 128, intermediate 18944), 8 slots of rank 16, bf16: a decode step's
    and a prefill chunk's tokens."""
    device, dtype, hidden, inter, slots, rank = torch.device("cuda"), torch.bfloat16, 3584, 18944, 8, 16
    _check_ops_into_view(num_tokens, hidden, inter, slots * 3 * rank, dtype, device)
    _check_mask(num_tokens, inter, slots, rank, dtype, device)
    _check_layers(num_tokens, hidden, 3584, 512, inter, slots, rank, dtype, device, assert_close)
