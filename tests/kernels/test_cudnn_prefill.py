"""Long prefill chunks through cuDNN (gantry_kernels/cudnn_prefill.py) beside the Triton kernels for the rest of the
batch: same results as gantry_kernels/reference.py. On CPU cuDNN's call is stood in for by plain torch (with its
log-sum-exp), so the gather, packing, merge and dispatch run through Triton's interpreter."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import gantry_kernels.cudnn_prefill as cudnn_prefill
import gantry_kernels.paged_attention as paged
from gantry_kernels import reference

Check = Callable[[torch.Tensor, torch.Tensor], None]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# (new tokens, context before them) per sequence: decodes, long chunks (8+ new tokens, 8+ deep, pieces of 16
# and 8: pieces reaching the chunk, pieces and a rest, too shallow) and short ones between them
SCENARIO = [(1, 30), (9, 40), (1, 7), (0, 5), (12, 0), (3, 3), (8, 90), (10, 16), (11, 15)]


def _math_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale  # [1, h, n, m]
    if causal:  # top-left: row i sees keys 0..i
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ v.double()).to(q.dtype), lse.float()[..., None]


def _run(make_paged_kv: Callable, scenario: list[tuple[int, int]], num_heads: int, num_kv_heads: int, head_dim: int,
         block_size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    q_lens = [q for q, _ in scenario]
    seq_lens = [q + c for q, c in scenario]
    k_cache, v_cache, block_tables, lens = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    loc = [0]
    for q in q_lens:
        loc.append(loc[-1] + q)
    query_start_loc = torch.tensor(loc, dtype=torch.int32, device=device)
    query = torch.randn(loc[-1], num_heads, head_dim, device=device).to(dtype)
    out = paged.paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, head_dim**-0.5,
                                max_query_len=max(q_lens), max_seq_len=max(seq_lens),
                                query_start_loc_host=loc, seq_lens_host=seq_lens)
    ref = reference.paged_attention(query, k_cache, v_cache, block_tables, query_start_loc, lens, head_dim**-0.5)
    return out, ref


# the cuDNN calls SCENARIO makes, as (keys, causal), at each relative rate of the Triton kernel
CALLS = {
    # (9, 40): pieces 16, 16, 8, then its own 9 tokens causal (padded to 10 rows); (8, 90): five of 16 and one
    # of 8, then 2 + 8 causal; (10, 16): one piece, 10 causal; (11, 15): one of 8, 7 + 11 causal (20 rows)
    0.6: [(10, True), (16, False), (16, False), (8, False), (10, True)] + [(16, False)] * 5 + [(8, False)]
    + [(10, True), (16, False), (20, True), (8, False)],
    # a faster Triton kernel: the rest of (11, 15), 7 + 11 keys padded to 20 rows, goes to it instead
    0.8: [(10, True), (16, False), (16, False), (8, False), (10, True)] + [(16, False)] * 5 + [(8, False)]
    + [(10, True), (16, False), (8, False)],
}


@pytest.mark.parametrize("rate", sorted(CALLS))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 2), (4, 4)])
def test_long_chunks_beside_short_ones(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                                       monkeypatch: pytest.MonkeyPatch, num_heads: int, num_kv_heads: int,
                                       rate: float) -> None:
    calls = []
    monkeypatch.setattr(cudnn_prefill, "CUDNN_MIN_QUERY", 8)
    monkeypatch.setattr(cudnn_prefill, "KEY_PIECES", (16, 8))
    monkeypatch.setattr(cudnn_prefill, "TRITON_RELATIVE_RATE", rate)
    monkeypatch.setattr(cudnn_prefill, "PIECE_BATCHES", (1,))  # one piece a call (test_batched_pieces: batched)
    monkeypatch.setattr(paged, "can_use_cudnn", lambda *a: True)
    monkeypatch.setattr(cudnn_prefill, "_sdpa",
                        lambda *a, causal=False: calls.append((a[1].shape[2], causal)) or _math_sdpa(*a, causal=causal))
    out, ref = _run(make_paged_kv, SCENARIO, num_heads, num_kv_heads, 16, 4, torch.float32, device)
    assert_close(out, ref)
    assert calls == CALLS[rate]


def test_long_chunk_rule() -> None:
    long = cudnn_prefill.is_long_chunk
    assert long(8192, 120000, 28, 128) and long(512, 8192 + 512, 28, 128)
    assert not long(511, 100000, 28, 128) and not long(8192, 8192 + 8191, 28, 128)  # too short, too shallow
    assert not long(8192, 2_000_000, 28, 128)  # its partials would pass MAX_PARTIAL_BYTES: the Triton kernel
    # the scheduler flags the same chunks (the engine core then collects the step in flight before launching)
    from engine.scheduler import DEEP_CHUNK_START, DEEP_CHUNK_TOKENS

    assert (DEEP_CHUNK_TOKENS, DEEP_CHUNK_START) == (cudnn_prefill.CUDNN_MIN_QUERY, cudnn_prefill.KEY_PIECES[-1])


def test_pieces_and_rests() -> None:
    assert cudnn_prefill.piece_sizes(14 * 8192) == [16384] * 7  # a 120K prompt's last chunk: no rest before it
    assert cudnn_prefill.piece_sizes(3 * 8192 + 100) == [16384, 8192] and cudnn_prefill.piece_sizes(8191) == []
    assert cudnn_prefill.rest_on_cudnn(8192, 0) and cudnn_prefill.rest_on_cudnn(8192, 8191)
    assert cudnn_prefill.rest_on_cudnn(4064, 4096) and not cudnn_prefill.rest_on_cudnn(512, 8000)


def test_padded_rows() -> None:
    assert [cudnn_prefill.padded_rows(n) for n in (1024, 1025, 1152, 1153, 2047, 8192, 8193)] == [
        1024, 1152, 1152, 1280, 2048, 8192, 9216]
    assert [cudnn_prefill.padded_rows(n, 4) for n in (1024, 1025, 1280, 1281, 4064, 8192, 8193)] == [
        1024, 1280, 1280, 1536, 4096, 8192, 10240]
    for steps, count in ((8, 33), (4, 17)):
        assert cudnn_prefill.ladder(512, 8192, steps) == sorted({cudnn_prefill.padded_rows(n, steps) for n in range(512, 8193)})
        assert len(cudnn_prefill.ladder(512, 8192, steps)) == count


def test_short_steps_keep_the_triton_kernels(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paged, "can_use_cudnn", lambda *a: True)
    monkeypatch.setattr(cudnn_prefill, "_sdpa", lambda *a: pytest.fail("a short step took the cuDNN path"))
    out, ref = _run(make_paged_kv, SCENARIO, 8, 2, 16, 4, torch.float32, device)
    assert_close(out, ref)


def test_fp32_and_fp8_pages_stay_on_triton() -> None:
    assert not cudnn_prefill.can_use_cudnn(torch.float32, torch.zeros(1, 4, 2, 16), 1.0, 1.0)  # CPU / fp32
    if torch.cuda.is_available():
        bf16 = torch.bfloat16
        assert not cudnn_prefill.can_use_cudnn(bf16, torch.zeros(1, 4, 2, 16, device="cuda").to(torch.float8_e4m3fn), 1.0, 1.0)
        assert not cudnn_prefill.can_use_cudnn(bf16, torch.zeros(1, 4, 2, 16, device="cuda", dtype=bf16), 0.5, 1.0)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("batches", [(1,), (4, 2, 1)])  # PIECE_BATCHES: one piece a call, or equal ones batched
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim,block_size", [
    (torch.bfloat16, 28, 4, 128, 16), (torch.float16, 14, 2, 64, 32), (torch.bfloat16, 8, 8, 128, 16)])
def test_cudnn_chunks_gpu(make_paged_kv: Callable, assert_close: Check, monkeypatch: pytest.MonkeyPatch,
                          dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                          batches: tuple[int, ...]) -> None:
    monkeypatch.setattr(cudnn_prefill, "PIECE_BATCHES", batches)
    if not cudnn_prefill.can_use_cudnn(dtype, torch.zeros(1, block_size, num_kv_heads, head_dim, dtype=dtype, device="cuda"),
                                       1.0, 1.0):
        pytest.skip("cuDNN attention not available for this shape here")
    # (1500, 40000): two pieces (one call of two when batched), a rest of 7,232 keys on Triton; (2100, 16384): one piece, its own keys causal;
    # (1030, 17000) and (600, 8300): a piece, then 616 or 108 keys and its own in one causal square
    scenario = [(1, 3000), (1500, 40000), (5, 9), (1024, 0), (1, 1), (2100, 16384), (0, 40), (1030, 17000), (600, 8300)]
    out, ref = _run(make_paged_kv, scenario, num_heads, num_kv_heads, head_dim, block_size, dtype, torch.device("cuda"))
    assert_close(out, ref)


@pytest.mark.gpu
@requires_cuda
def test_warmup_builds_every_shape_gpu() -> None:
    k_cache = torch.zeros(64, 16, 4, 128, dtype=torch.bfloat16, device="cuda")
    if not cudnn_prefill.can_use_cudnn(torch.bfloat16, k_cache, 1.0, 1.0):
        pytest.skip("cuDNN attention not available here")
    cudnn_prefill.warmup(k_cache, 28, torch.bfloat16, 1.0, 1.0, max_query_len=1024, max_model_len=40000)


def test_piece_calls() -> None:
    assert cudnn_prefill.piece_calls([16384] * 7, (4, 2, 1)) == [(16384, 4), (16384, 2), (16384, 1)]
    assert cudnn_prefill.piece_calls([16384] * 6 + [8192], (4, 2, 1)) == [(16384, 4), (16384, 2), (8192, 1)]
    assert cudnn_prefill.piece_calls([16384] * 3, (1,)) == [(16384, 1)] * 3
    assert cudnn_prefill.piece_calls([], (4, 1)) == []


@pytest.mark.parametrize("batches", [(2, 1), (4, 2, 1)])
def test_batched_pieces(make_paged_kv: Callable, assert_close: Check, device: torch.device,
                        monkeypatch: pytest.MonkeyPatch, batches: tuple[int, ...]) -> None:
    """Equal pieces sharing one cuDNN call as its batch (PIECE_BATCHES): the same results, fewer calls."""
    calls = []
    monkeypatch.setattr(cudnn_prefill, "CUDNN_MIN_QUERY", 8)
    monkeypatch.setattr(cudnn_prefill, "KEY_PIECES", (16, 8))
    monkeypatch.setattr(cudnn_prefill, "PIECE_BATCHES", batches)
    monkeypatch.setattr(paged, "can_use_cudnn", lambda *a: True)
    monkeypatch.setattr(cudnn_prefill, "_sdpa", lambda *a, causal=False: calls.append(
        (a[0].shape[0], a[1].shape[2], causal)) or _math_sdpa(*a, causal=causal))
    out, ref = _run(make_paged_kv, SCENARIO, 8, 2, 16, 4, torch.float32, device)
    assert_close(out, ref)
    pieces = [(batch, keys) for batch, keys, causal in calls if not causal]
    assert sum(batch * keys for batch, keys in pieces) == sum(keys for keys, c in CALLS[0.6] if not c)
    assert (2, 16) in pieces and len(pieces) < sum(1 for _, c in CALLS[0.6] if not c)
