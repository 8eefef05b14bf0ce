"""The paged_attention dispatcher and get_ops: same results whichever kernel it picks."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import gantry_kernels
from gantry_kernels import reference
from gantry_kernels.paged_attention import paged_attention

Check = Callable[[torch.Tensor, torch.Tensor], None]


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 2, 0], [3, 0, 0], [0, 1, 2]])
@pytest.mark.parametrize("pass_max_query_len", [True, False])
def test_dispatch_matches_reference(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                                    q_lens: list[int], pass_max_query_len: bool) -> None:
    # [1, 2, 0] and [0, 1, 2] have as many tokens as sequences but are not decode batches.
    seq_lens = [q + 20 for q in q_lens]
    k_cache, v_cache, block_tables, lens = make_paged_kv(seq_lens, 2, 32, 4, torch.float32)
    query_start_loc = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32).to(device)
    query = torch.randn(sum(q_lens), 8, 32, device=device)
    hints = {"max_query_len": max(q_lens), "max_seq_len": max(seq_lens)} if pass_max_query_len else {}
    out = paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, 0.3, **hints)
    assert_close(out, reference.paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, 0.3))


def test_get_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    from gantry_kernels import triton_ops

    assert gantry_kernels.get_ops("cuda") is triton_ops
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # get_ops may set it; monkeypatch restores it after
    monkeypatch.delenv("GANTRY_TRITON_INTERPRET", raising=False)
    assert gantry_kernels.get_ops("cpu") is reference
    monkeypatch.setenv("GANTRY_TRITON_INTERPRET", "1")
    assert gantry_kernels.get_ops("cpu") is triton_ops
    for name in triton_ops.__all__:  # the twins have the same functions
        assert callable(getattr(reference, name))
