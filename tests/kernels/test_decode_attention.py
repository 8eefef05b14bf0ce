"""Paged decode attention: Triton against reference over shuffled pages, GQA, splits, CUDA graphs."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gantry_kernels import reference
from gantry_kernels.decode_attention import choose_num_splits, decode_attention

Check = Callable[[torch.Tensor, torch.Tensor], None]


def _run(make_paged_kv: Callable, assert_close: Check, device: torch.device, seq_lens: list[int], num_heads: int,
         num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, num_splits: int | None = None) -> None:
    k_cache, v_cache, block_tables, lens = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    query = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(dtype)  # [num_seqs, num_heads, head_dim]
    scale = head_dim**-0.5
    out = decode_attention(query, k_cache, v_cache, block_tables, lens, scale, num_splits=num_splits)
    assert_close(out, reference.decode_attention(query, k_cache, v_cache, block_tables, lens, scale))


@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1), (7, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_gqa_block_sizes(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                                num_heads: int, num_kv_heads: int, block_size: int) -> None:
    _run(make_paged_kv, assert_close, device, [1, 17, 70, 33], num_heads, num_kv_heads, 32, block_size, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 16])
def test_decode_splits(make_paged_kv: Callable, assert_close: Check, device: torch.device, num_splits: int) -> None:
    # Short sequences leave some splits empty; 16 splits of 64-token tiles outnumber the tiles of 300.
    _run(make_paged_kv, assert_close, device, [3, 300, 64, 129], 8, 2, 64, 16, torch.float32, num_splits)


def test_decode_empty_splits_write_nothing_the_merge_reads(make_paged_kv: Callable, assert_close: Check,
                                                          device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty split stores m = -inf alone and the merge skips its l and acc: partial buffers born NaN
    # must not reach the output.
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    _run(make_paged_kv, assert_close, device, [3, 300, 1, 64], 8, 2, 64, 16, torch.float32, 16)


def test_decode_long_context_auto_split(make_paged_kv: Callable, assert_close: Check, device: torch.device) -> None:
    seq_lens = [2500, 1800]
    assert choose_num_splits(len(seq_lens), 2, 2500, device) > 1  # this test covers the split path
    _run(make_paged_kv, assert_close, device, seq_lens, 8, 2, 32, 16, torch.float32)


def test_decode_fp16(make_paged_kv: Callable, assert_close: Check, device: torch.device) -> None:
    # bf16 dots are wrong under the interpreter (triton 3.9), so bf16 runs only on the GPU.
    _run(make_paged_kv, assert_close, device, [40, 100, 1], 16, 2, 64, 16, torch.float16, 3)


def test_decode_empty_context_gives_zeros(make_paged_kv: Callable, device: torch.device) -> None:
    """A padded slot of a captured batch (seq_len 0) yields zeros, not NaN, and leaves others right."""
    k_cache, v_cache, block_tables, lens = make_paged_kv([20, 1], 1, 32, 4, torch.float32)
    lens[1] = 0
    query = torch.randn(2, 4, 32, device=device)
    for num_splits in (1, 3):
        out = decode_attention(query, k_cache, v_cache, block_tables, lens, 0.2, num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        ref = reference.decode_attention(query[:1], k_cache, v_cache, block_tables[:1], lens[:1], 0.2)
        torch.testing.assert_close(out[:1], ref)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (dtype, num_heads, num_kv_heads, head_dim, block_size): each dtype, head size, block size and GQA ratio
GPU_CASES = [
    (torch.bfloat16, 32, 8, 128, 16),
    (torch.bfloat16, 28, 4, 128, 16),
    (torch.float16, 28, 4, 128, 32),
    (torch.bfloat16, 8, 8, 64, 128),
    (torch.float16, 64, 8, 64, 16),
    (torch.bfloat16, 16, 2, 256, 64),
    (torch.float16, 32, 32, 32, 16),
    (torch.float32, 14, 2, 128, 16),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size", GPU_CASES)
def test_decode_gpu(make_paged_kv: Callable, assert_close: Check, dtype: torch.dtype, num_heads: int,
                    num_kv_heads: int, head_dim: int, block_size: int) -> None:
    seq_lens = torch.randint(1, 5000, (13,)).tolist() + [1, 8191]
    _run(make_paged_kv, assert_close, torch.device("cuda"), seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.gpu
@requires_cuda
def test_decode_cuda_graph_replay(make_paged_kv: Callable, assert_close: Check) -> None:
    """Captured once, replayed on new lengths and new (shuffled) block tables: no host sync inside."""
    device = torch.device("cuda")
    num_seqs, max_len = 8, 3000
    k_cache, v_cache, block_tables, lens = make_paged_kv([max_len] * num_seqs, 8, 128, 16, torch.bfloat16)
    query = torch.randn(num_seqs, 32, 128, device=device).to(torch.bfloat16)
    decode_attention(query, k_cache, v_cache, block_tables, lens, 0.1)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(query, k_cache, v_cache, block_tables, lens, 0.1)
    for _ in range(3):
        lens.copy_(torch.randint(1, max_len + 1, (num_seqs,), dtype=torch.int32))
        block_tables.copy_(block_tables[torch.randperm(num_seqs)])
        query.copy_(torch.randn_like(query))
        graph.replay()
        assert_close(out, reference.decode_attention(query, k_cache, v_cache, block_tables, lens, 0.1))
