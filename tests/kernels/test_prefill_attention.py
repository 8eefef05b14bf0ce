"""Paged prefill / chunked-prefill attention: Triton against reference for every mix of q_len."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from gantry_kernels import reference
from gantry_kernels.prefill_attention import prefill_attention

Check = Callable[[torch.Tensor, torch.Tensor], None]

# (q_len, earlier context) per sequence
SCENARIOS = {
    "prefill": [(7, 0), (33, 0), (1, 0), (70, 0)],
    "chunked": [(16, 48), (5, 100), (40, 3)],
    "decode": [(1, 30), (1, 0), (1, 77)],
    "mixed": [(1, 50), (0, 9), (25, 0), (12, 64), (1, 5), (0, 0), (64, 1)],
}


def _run(make_paged_kv: Callable, assert_close: Check, device: torch.device, scenario: list[tuple[int, int]],
         num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
         block_m: int | None = None, block_n: int | None = None, **launch: object) -> None:
    q_lens = [q for q, _ in scenario]
    seq_lens = [q + c for q, c in scenario]
    k_cache, v_cache, block_tables, lens = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    query_start_loc = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    query = torch.randn(sum(q_lens), num_heads, head_dim, device=device).to(dtype)  # [num_tokens, num_heads, head_dim]
    scale = head_dim**-0.5
    out = prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, scale,
                            block_m=block_m, block_n=block_n, **launch)
    assert_close(out, reference.paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, scale))


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
def test_prefill_scenarios(make_paged_kv: Callable, assert_close: Check, device: torch.device, scenario: str,
                           num_heads: int, num_kv_heads: int) -> None:
    _run(make_paged_kv, assert_close, device, SCENARIOS[scenario], num_heads, num_kv_heads, 32, 16, torch.float32)


@pytest.mark.parametrize("pack_gqa", [True, False])
@pytest.mark.parametrize("block_size", [1, 4, 32])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64)])
def test_prefill_tiles_and_pages(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                                 block_size: int, block_m: int, block_n: int, pack_gqa: bool) -> None:
    # Packed, group 7 pads to 8 rows per token: block_m 16 then holds two new tokens of all 7 heads.
    # Unpacked, a program takes block_m new tokens of one query head.
    _run(make_paged_kv, assert_close, device, SCENARIOS["mixed"], 14, 2, 64, block_size, torch.float32, block_m, block_n,
         pack_gqa=pack_gqa)


@pytest.mark.parametrize("pack_gqa", [True, False])
@pytest.mark.parametrize("num_splits", [2, 5])
def test_prefill_split_kv(make_paged_kv: Callable, assert_close: Check, device: torch.device, pack_gqa: bool,
                          num_splits: int) -> None:
    # split-KV: some splits empty (short contexts), the diagonal in the last one, lengths off the page size
    scenario = [(16, 48), (5, 100), (40, 3), (1, 77), (0, 9), (33, 0)]
    _run(make_paged_kv, assert_close, device, scenario, 14, 2, 64, 4, torch.float32, 16, 16, pack_gqa=pack_gqa,
         num_splits=num_splits)


def test_choose_prefill_splits() -> None:
    from gantry_kernels.prefill_attention import MAX_PREFILL_SPLITS, choose_prefill_splits

    gpu = torch.device("cuda")  # 132 SMs on an H200; the count is only read on a CUDA device
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else None
    if sms is None:
        gpu = torch.device("cpu")  # the interpreter's stand-in count (8)
        sms = 8
    assert choose_prefill_splits(8 * sms, 120_000, 1 << 20, gpu) == 1  # enough programs already
    assert choose_prefill_splits(sms, 120_000, 1 << 20, gpu) == 8  # 8 waves wanted
    assert choose_prefill_splits(1, 120_000, 1 << 20, gpu) == MAX_PREFILL_SPLITS
    assert choose_prefill_splits(1, 5000, 1 << 20, gpu) == 2  # 2048 keys at least per split
    assert choose_prefill_splits(1, 120_000, 200 << 20, gpu) == 2  # partials within 512 MiB
    assert choose_prefill_splits(1, None, 1 << 20, gpu) == 1  # no host-side length: no split


def test_prefill_long_chunk_launch(make_paged_kv: Callable, assert_close: Check, device: torch.device) -> None:
    # max_query_len at the long-chunk threshold picks the unpacked launch; pages shuffled, lengths off the page size
    from gantry_kernels.prefill_attention import LONG_QUERY

    scenario = [(LONG_QUERY, 37), (3, 600), (LONG_QUERY // 2 + 5, 0)]
    _run(make_paged_kv, assert_close, device, scenario, 6, 2, 32, 16, torch.float32, max_query_len=LONG_QUERY)


def test_prefill_group_wider_than_tile(make_paged_kv: Callable, assert_close: Check, device: torch.device) -> None:
    _run(make_paged_kv, assert_close, device, SCENARIOS["chunked"], 32, 1, 32, 8, torch.float32, 16, 16)


def test_prefill_fp16(make_paged_kv: Callable, assert_close: Check, device: torch.device) -> None:
    # bf16 dots are wrong under the interpreter (triton 3.9), so bf16 runs only on the GPU.
    _run(make_paged_kv, assert_close, device, SCENARIOS["mixed"], 8, 2, 64, 16, torch.float16)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (dtype, num_heads, num_kv_heads, head_dim, block_size)
GPU_CASES = [
    (torch.bfloat16, 32, 8, 128, 16),
    (torch.bfloat16, 28, 4, 128, 16),
    (torch.float16, 28, 4, 128, 64),
    (torch.bfloat16, 14, 2, 64, 32),
    (torch.float16, 8, 8, 64, 16),
    (torch.bfloat16, 16, 2, 256, 16),
    (torch.float32, 16, 2, 128, 16),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size", GPU_CASES)
def test_prefill_gpu(make_paged_kv: Callable, assert_close: Check, dtype: torch.dtype, num_heads: int,
                     num_kv_heads: int, head_dim: int, block_size: int) -> None:
    scenario = [(1000, 0), (1, 3000), (300, 2700), (0, 40), (517, 1), (1, 1), (2048, 0)]
    # the short launch, the long-chunk one, and both with split keys
    for launch in ({}, {"max_query_len": 2048}, {"max_query_len": 2048, "num_splits": 3}, {"num_splits": 4}):
        _run(make_paged_kv, assert_close, torch.device("cuda"), scenario, num_heads, num_kv_heads, head_dim, block_size,
             dtype, **launch)


def test_warmup_runs_on_a_small_pool(device: torch.device) -> None:
    # the engine calls it once the pool exists; sizes that do not fit the pool are skipped
    from gantry_kernels.prefill_attention import warmup

    k_cache = torch.zeros(8, 16, 2, 32, device=device)  # [num_blocks, block_size, num_kv_heads, head_dim]
    warmup(k_cache, torch.zeros_like(k_cache), 4, torch.float32, 32**-0.5)
