"""gantry_kernels/cpu_ops.py (the C kernels of gantry_kernels/cpu_attention.c) against gantry_kernels/reference.py on CPU:
paged attention over shuffled pages (prefill, chunked, decode in one batch), KV store, norms, rotary, SiLU."""
from __future__ import annotations

import pytest
import torch

from gantry_kernels import cpu_ops, reference

H, HKV, D, BS, NB = 9, 3, 64, 16, 40


@pytest.fixture(autouse=True)
def _native() -> None:
    if cpu_ops._native() is None:
        pytest.skip("no AVX2 or no C compiler: cpu_ops runs the reference itself")


def test_paged_attention_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(NB, BS, HKV, D, generator=g), torch.randn(NB, BS, HKV, D, generator=g)
    seq_lens = torch.tensor([5, 37, 100, 1, 16], dtype=torch.int32)
    q_lens = torch.tensor([5, 1, 30, 1, 16])  # a prompt, decodes, a chunk after a prefix, a full page
    starts = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).int()
    tables = torch.stack([torch.randperm(NB, generator=g)[:8] for _ in range(5)]).int()
    q = torch.randn(int(starts[-1]), H, D, generator=g)
    want = reference.paged_attention(q, k, v, tables, starts, seq_lens, 0.125)
    got = cpu_ops.paged_attention(q, k, v, tables, starts, seq_lens, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    dec = cpu_ops.decode_attention(q[:4], k, v, tables[:4], torch.tensor([7, 37, 100, 1], dtype=torch.int32), 0.125)
    torch.testing.assert_close(dec, reference.decode_attention(q[:4], k, v, tables[:4],
                                                               torch.tensor([7, 37, 100, 1], dtype=torch.int32), 0.125),
                               rtol=1e-5, atol=1e-5)


def test_store_and_elementwise_match_reference() -> None:
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(NB, BS, HKV, D, generator=g), torch.randn(NB, BS, HKV, D, generator=g)
    k2, v2 = k.clone(), v.clone()
    slots = torch.tensor([3, -1, 100, 7])
    kn, vn = torch.randn(4, HKV, D, generator=g), torch.randn(4, HKV, D, generator=g)
    reference.store_kvcache(kn, vn, k, v, slots)
    cpu_ops.store_kvcache(kn, vn, k2, v2, slots)
    assert torch.equal(k, k2) and torch.equal(v, v2)

    x, r, w = torch.randn(7, 576, generator=g), torch.randn(7, 576, generator=g), torch.randn(576, generator=g)
    r_before = r.clone()
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    for got, want in zip(cpu_ops.fused_add_rms_norm(x, r, w, 1e-5), reference.fused_add_rms_norm(x, r, w, 1e-5)):
        torch.testing.assert_close(got, want)
    assert torch.equal(r, r_before)  # the caller's residual is not written

    qkv = torch.randn(7, (H + 2 * HKV) * D, generator=g)
    q, kk, _ = qkv.split([H * D, HKV * D, HKV * D], dim=-1)  # views with the fused row stride
    q, kk = q.reshape(-1, H, D), kk.reshape(-1, HKV, D)
    cos_sin, pos = torch.randn(200, D, generator=g), torch.randint(0, 200, (7,), generator=g)
    want_q, want_k = reference.rotary_embedding(pos, q, kk, cos_sin)
    got_q, got_k = cpu_ops.rotary_embedding(pos, q, kk, cos_sin)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    gu = torch.randn(7, 2 * 1536, generator=g)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gu), reference.silu_and_mul(gu))


def test_other_dtypes_fall_back_to_reference() -> None:
    x, w = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(64, dtype=torch.bfloat16)
    assert torch.equal(cpu_ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    assert cpu_ops.lora_shrink is reference.lora_shrink  # ops without a C version are the reference's


def test_an_install_without_the_c_source_falls_back(tmp_path) -> None:
    """An install that lacks a kernel's C source (or a compiler) runs the torch code: None, no error."""
    from gantry_kernels import cpu_native

    assert cpu_native.load(str(tmp_path / "missing.c")) is None
