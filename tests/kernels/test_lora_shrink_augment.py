"""lora_shrink_augment (augmented K's input [x, x @ A_all^T masked to each token's own slot] in one launch)
against torch, for several batch sizes, shapes and slots (-1 included), with and without split-K; two calls
in a row check that split-K hands its workspace and counters back all zero; on a GPU, W1's projections
replayed in a CUDA graph."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels.lora import SPLIT_K_MAX_TOKENS, lora_shrink_augment, shrink_config

Check = Callable[[torch.Tensor, torch.Tensor], None]
# bf16 dots are wrong under the interpreter (triton 3.9): bf16 only on the GPU, fp16 everywhere
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _reference(x: torch.Tensor, a_all: torch.Tensor, token_slots: torch.Tensor, cols_per_slot: int) -> torch.Tensor:
    """[x, t masked] in x's dtype, t = x @ a_all^T in float32: [M, K + T]."""
    t = x.float() @ a_all.float().t()  # [M, T]
    col_slot = torch.arange(a_all.shape[0], device=x.device) // cols_per_slot
    keep = col_slot[None, :] == token_slots[: x.shape[0], None]
    return torch.cat([x, (t * keep).to(x.dtype)], dim=1)


def _buffers(device: torch.device, m: int, num_t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace [M + 3, T + 5] float32, counters int32): zero, a little larger than needed (strided rows)."""
    return (torch.zeros(m + 3, num_t + 5, dtype=torch.float32, device=device),
            torch.zeros(4096, dtype=torch.int32, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 7, 64, 300])
@pytest.mark.parametrize("k,num_slots,cols_per_slot,split_k", [
    (160, 4, 16, 1), (160, 4, 16, 3), (200, 3, 48, 1), (200, 3, 48, 2), (96, 8, 16, 5)])
def test_matches_torch(assert_close: Check, device: torch.device, dtype: torch.dtype, m: int, k: int, num_slots: int,
                       cols_per_slot: int, split_k: int) -> None:
    num_t = num_slots * cols_per_slot
    workspace, counters = _buffers(device, m, num_t)
    for _ in range(2):  # fresh inputs each call: a workspace left dirty by the first would show in the second
        token_slots = torch.randint(-1, num_slots, (m + 4,), dtype=torch.int32, device=device)  # tail: stale
        token_slots[0] = -1  # a token without an adapter in every batch
        x = torch.randn(m, k, device=device).to(dtype)
        a_all = (torch.randn(num_t, k, device=device) / k**0.5).to(dtype)
        out = torch.full((m, k + num_t), float("nan"), device=device, dtype=dtype)  # every element written
        lora_shrink_augment(x, a_all, token_slots, cols_per_slot, out, workspace, counters, block_m=16, block_n=32,
                            block_k=32, split_k=split_k)
        want = _reference(x, a_all, token_slots, cols_per_slot)
        assert torch.equal(out[:, :k], x)  # the copy of x, bit for bit
        assert_close(out[:, k:], want[:, k:])
        masked = (torch.arange(num_t, device=device) // cols_per_slot)[None, :] != token_slots[:m, None]
        assert not out[:, k:][masked].any()  # other slots' columns and slot -1's: exact zeros
        assert not workspace.any() and not counters.any()


@pytest.mark.parametrize("m", [1, 64, 300, SPLIT_K_MAX_TOKENS + 1])
def test_default_config(assert_close: Check, device: torch.device, m: int) -> None:
    """shrink_config's pick (split-K at decode sizes, none past the workspace) at a T of qkv's layout."""
    k, num_slots, cols_per_slot = 256, 8, 48
    num_t = num_slots * cols_per_slot
    block_m, block_n, block_k, split_k, _ = shrink_config(m, k, num_t)
    assert (split_k > 1) == (m <= SPLIT_K_MAX_TOKENS) and block_m * block_n * block_k > 0
    workspace, counters = _buffers(device, min(m, SPLIT_K_MAX_TOKENS), num_t)
    token_slots = torch.randint(-1, num_slots, (m,), dtype=torch.int32, device=device)
    x = torch.randn(m, k, device=device)
    a_all = torch.randn(num_t, k, device=device) / k**0.5
    out = torch.empty(m, k + num_t, device=device)
    lora_shrink_augment(x, a_all, token_slots, cols_per_slot, out, workspace, counters)
    assert_close(out, _reference(x, a_all, token_slots, cols_per_slot))
    assert not workspace.any() and not counters.any()


def test_split_k_needs_room(device: torch.device) -> None:
    """An explicit split-K with a workspace too small for the batch is refused, not run out of bounds."""
    x, a_all = torch.randn(40, 64, device=device), torch.randn(32, 64, device=device)
    workspace, counters = _buffers(device, 8, 32)
    out = torch.empty(40, 96, device=device)
    slots = torch.zeros(40, dtype=torch.int32, device=device)
    with pytest.raises(AssertionError, match="too small"):
        lora_shrink_augment(x, a_all, slots, 16, out, workspace, counters, split_k=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k,num_t", [(3584, 384), (3584, 128), (18944, 128)])
@pytest.mark.parametrize("m", [48, 256, 2048])
def test_w1_shapes_in_cuda_graph(assert_close: Check, m: int, k: int, num_t: int) -> None:
    """Qwen2-7B's qkv, o and down (8 rank-16 slots) with the default config, replayed three times in one
    CUDA graph on new inputs each time: the workspace must come back zero with no memset between calls."""
    dev, cols_per_slot = torch.device("cuda"), num_t // 8
    workspace = torch.zeros(SPLIT_K_MAX_TOKENS, num_t, dtype=torch.float32, device=dev)
    counters = torch.zeros(4096, dtype=torch.int32, device=dev)
    x = torch.empty(m, k, device=dev, dtype=torch.bfloat16)
    a_all = (torch.randn(num_t, k, device=dev) / k**0.5).to(torch.bfloat16)
    slots = torch.empty(m, dtype=torch.int32, device=dev)
    out = torch.empty(m, k + num_t, device=dev, dtype=torch.bfloat16)

    def run() -> None:
        lora_shrink_augment(x, a_all, slots, cols_per_slot, out, workspace, counters)

    x.normal_()
    slots.random_(-1, 8)
    run()  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        x.normal_()
        slots.random_(-1, 8)
        graph.replay()
        assert_close(out, _reference(x, a_all, slots, cols_per_slot))
    torch.cuda.synchronize()
    assert not workspace.any() and not counters.any()
