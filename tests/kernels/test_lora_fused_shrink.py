"""lora_shrink_augment (kernels/lora.py): out [M, K + T] = [x, (x @ a_all^T) masked to each token's own slot] in
one launch, against torch on fresh inputs: M and K off the block sizes, T of qkv/gate_up/o (384/256/128 at W1's
8 rank-16 adapters, scaled down), slots of -1 and a stale tail past M, one split and several (the split-K
counters zero again after every launch, so a second call works), the config rule; on the GPU also W1's shapes
and a CUDA graph replayed with new inputs."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kernels.lora import lora_counters, lora_shrink_augment

Check = Callable[[torch.Tensor, torch.Tensor], None]
# bf16 dots are wrong under the interpreter (triton 3.9): bf16 only on the GPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
# (M, K, T, cols_per_slot, config (BLOCK_M, BLOCK_T, BLOCK_K, num_splits, num_warps, num_stages) or None: the rule)
CASES = [(37, 200, 128, 16, (16, 64, 64, 1, 4, 3)),  # o/down-like: one slice, one split, M and K off the blocks
         (37, 200, 384, 48, (16, 64, 64, 3, 4, 3)),  # qkv-like: 3 slices, split-K (K's last split partial)
         (70, 320, 256, 32, (32, 32, 32, 4, 4, 2)),  # gate_up-like, EVEN_K
         (20, 400, 128, 16, (16, 32, 32, 6, 4, 2)),  # 5 splits (6 trimmed): the sum's second group of 4
         (5, 96, 384, 48, None)]  # decode of a few tokens, the rule (2 "SMs" under the interpreter: split-K)


def _inputs(m: int, k: int, num_t: int, cols_per_slot: int, dtype: torch.dtype,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x [m, k], a_all [num_t, k], token_slots [m + 3] int32): slots of every adapter and -1, a stale tail."""
    x = torch.randn(m, k, device=device).to(dtype)
    a_all = (torch.randn(num_t, k, device=device) / k**0.5).to(dtype)
    token_slots = torch.randint(-1, num_t // cols_per_slot, (m + 3,), dtype=torch.int32, device=device)
    return x, a_all, token_slots


def _check(out: torch.Tensor, x: torch.Tensor, a_all: torch.Tensor, token_slots: torch.Tensor, cols_per_slot: int,
           assert_close: Check) -> None:
    """x's copy exact, the kept columns of t close to torch's (in float64), every other column exactly 0."""
    m, k = x.shape
    keep = (torch.arange(a_all.shape[0], device=x.device) // cols_per_slot)[None, :] == token_slots[:m, None]
    want = (x.double() @ a_all.double().T) * keep  # [m, T]
    assert torch.equal(out[:, :k], x)
    assert not out[:, k:][~keep].any(), "a column of another slot (or of a token without one) is not 0"
    assert_close(out[:, k:], want.to(x.dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,num_t,cols_per_slot,config", CASES)
def test_shrink_augment(assert_close: Check, device: torch.device, dtype: torch.dtype, m: int, k: int, num_t: int,
                        cols_per_slot: int, config: tuple | None) -> None:
    for _ in range(2):  # fresh inputs twice: the split-K counters must be back at 0 after the first launch
        x, a_all, token_slots = _inputs(m, k, num_t, cols_per_slot, dtype, device)
        out = torch.full((m, k + num_t), float("nan"), device=device, dtype=dtype)  # every element written
        lora_shrink_augment(x, a_all, token_slots, cols_per_slot, out, config)
        _check(out, x, a_all, token_slots, cols_per_slot, assert_close)
        assert not lora_counters(device).any()


def test_lora_shrink_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.lora.augmented import lora_shrink

    monkeypatch.delenv("GANTRY_LORA_SHRINK", raising=False)
    assert lora_shrink() == "fused"
    monkeypatch.setenv("GANTRY_LORA_SHRINK", "mm")
    assert lora_shrink() == "mm"
    monkeypatch.setenv("GANTRY_LORA_SHRINK", "cublas")
    with pytest.raises(ValueError, match="GANTRY_LORA_SHRINK"):
        lora_shrink()


# W1's projections with 8 rank-16 adapters: (K, T, cols_per_slot)
W1 = {"qkv": (3584, 384, 48), "o": (3584, 128, 16), "gate_up": (3584, 256, 32), "down": (18944, 128, 16)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(W1))
@pytest.mark.parametrize("m", [1, 77, 256, 512])
def test_shrink_augment_gpu_w1(assert_close: Check, name: str, m: int) -> None:
    """W1's shapes in bf16 with the rule's config and explicit ones (wgmma tiles of 64 and 128 rows, split-K
    and not), each twice."""
    k, num_t, cols_per_slot = W1[name]
    configs = (None, (64, 64, 128, 1, 4, 3), (64, 128, 64, 8, 4, 4), (128, 64, 128, 4, 8, 3), (16, 32, 256, 16, 4, 2))
    for config in configs:
        for _ in range(2):
            x, a_all, token_slots = _inputs(m, k, num_t, cols_per_slot, torch.bfloat16, torch.device("cuda"))
            out = torch.full((m, k + num_t), float("nan"), device="cuda", dtype=torch.bfloat16)
            lora_shrink_augment(x, a_all, token_slots, cols_per_slot, out, config)
            _check(out, x, a_all, token_slots, cols_per_slot, assert_close)
            assert not lora_counters(x.device).any(), config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", [None, (32, 64, 128, 8, 4, 3), (64, 64, 128, 1, 4, 3)])
def test_shrink_augment_cuda_graph(assert_close: Check, config: tuple | None) -> None:
    """Captured once (scratch from the graph's pool, the counters outside it), replayed 3 times with new x, A
    and slots copied into the static inputs: each replay matches torch."""
    (k, num_t, cols_per_slot), m, dev = W1["qkv"], 256, torch.device("cuda")
    x, a_all, token_slots = _inputs(m, k, num_t, cols_per_slot, torch.bfloat16, dev)
    out = torch.empty(m, k + num_t, device=dev, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiled and the counters allocated before the capture
        lora_shrink_augment(x, a_all, token_slots, cols_per_slot, out, config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_shrink_augment(x, a_all, token_slots, cols_per_slot, out, config)
    for _ in range(3):
        new_x, new_a, new_slots = _inputs(m, k, num_t, cols_per_slot, torch.bfloat16, dev)
        x.copy_(new_x)
        a_all.copy_(new_a)
        token_slots.copy_(new_slots)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(out, x, a_all, token_slots, cols_per_slot, assert_close)
        assert not lora_counters(dev).any()
