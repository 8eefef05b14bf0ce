"""Kernel tests: the Triton kernels on the GPU when there is one, else on CPU through Triton's
interpreter (set here, before any kernel module is imported: Triton reads it when kernels are defined).
Every check draws fresh random inputs and compares with gantry_kernels/reference.py."""
from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    plain = {"gantry_kernels.reference", "gantry_kernels.cpu_ops", "gantry_kernels.cpu_native"}  # no Triton in these
    if any(name.startswith("gantry_kernels.") and name not in plain for name in sys.modules):
        raise pytest.UsageError("Triton kernels were defined before tests/kernels set TRITON_INTERPRET=1: set it in the environment")
    os.environ["TRITON_INTERPRET"] = "1"

PagedKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@pytest.fixture(autouse=True)
def _seed(request: pytest.FixtureRequest) -> None:
    # A different draw for every test (and parameter set), reproducible when one fails.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def make_paged_kv(device: torch.device) -> Callable[..., PagedKV]:
    """Random K/V pages for sequences of the given lengths, through shuffled, non-contiguous block
    tables whose unused entries point at live pages of other data (reading past seq_len shows)."""

    def make(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype) -> PagedKV:
        blocks_per_seq = [-(-n // block_size) for n in seq_lens]
        width = max(blocks_per_seq) + 2
        num_blocks = 2 * sum(blocks_per_seq) + 8  # half the pool unused: gaps between pages
        pages = torch.randperm(num_blocks)
        block_tables = torch.randint(0, num_blocks, (len(seq_lens), width), dtype=torch.int32)
        start = 0
        for i, n in enumerate(blocks_per_seq):
            block_tables[i, :n] = pages[start : start + 2 * n : 2]  # every other page of a shuffled pool
            start += 2 * n
        shape = (num_blocks, block_size, num_kv_heads, head_dim)  # [num_blocks, block_size, num_kv_heads, head_dim]
        k_cache = torch.randn(shape, device=device).to(dtype)
        v_cache = torch.randn(shape, device=device).to(dtype)
        lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        return k_cache, v_cache, block_tables.to(device), lens

    return make


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere fails."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    assert not out.isnan().any(), "NaN in output"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ||out - ref|| / ||ref|| bounds: fp32 runs IEEE dots; half types round P to 8 or 11 bits.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def assert_close() -> Callable[[torch.Tensor, torch.Tensor], None]:
    def check(out: torch.Tensor, ref: torch.Tensor) -> None:
        err = rel_error(out, ref)
        assert err < TOL[ref.dtype], f"relative error {err:.2e} over {TOL[ref.dtype]:.0e} ({ref.dtype})"

    return check
