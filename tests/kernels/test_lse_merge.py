"""gantry_kernels/lse_merge.py: normalised outputs over disjoint key sets (strided, rows offset as cuDNN's are) and a
Triton kernel's split partials (an empty split among them) merge to attention over all the keys."""
from __future__ import annotations

import pytest
import torch

from gantry_kernels.lse_merge import LOG2E, merge_normalized


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, h, D], k/v [m, h, D] -> (o [h, n, D], lse [h, n]) in float64."""
    s = torch.einsum("nhd,mhd->hnm", q.double(), k.double())
    return torch.einsum("hnm,mhd->hnd", torch.softmax(s, -1), v.double()), torch.logsumexp(s, -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_partials", [False, True])
def test_merge_matches_attention_over_all_keys(device: torch.device, dtype: torch.dtype, with_partials: bool) -> None:
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("bf16 runs on the GPU; the interpreter covers the same code in float32")
    n, heads, dim = 37, 4, 64
    sets = (5, 9, 300, 12)
    q = torch.randn(n, heads, dim, device=device)
    keys = [torch.randn(m, heads, dim, device=device) for m in sets]
    values = [torch.randn(m, heads, dim, device=device) for m in sets]
    ref, _ = _attention(q, torch.cat(keys), torch.cat(values))
    normalised = sets[:-1] if with_partials else sets
    sources = []
    for i, _ in enumerate(normalised):
        o, lse = _attention(q, keys[i], values[i])
        # stored as cuDNN lays a causal square out: [1, h, rows, D] over [rows, h, D] memory, 3 dropped rows first
        rows = torch.zeros(n + 3 + i, heads, dim, dtype=dtype, device=device)
        rows[3 : 3 + n] = o.transpose(0, 1).to(dtype)
        lse_rows = torch.zeros(heads, n + 3 + i, dtype=torch.float32, device=device)
        lse_rows[:, 3 : 3 + n] = lse.float()
        sources.append((rows.transpose(0, 1)[:, 3:], lse_rows[:, 3:]))
    partials = None
    if with_partials:  # the last set as two splits, the second one empty (m = -inf, l and acc never written)
        s = torch.einsum("nhd,mhd->nhm", q, keys[-1]) * LOG2E
        m = s.amax(-1)
        p = torch.exp2(s - m[..., None])
        empty = torch.full_like(m, float("nan"))
        partials = (torch.stack([m, torch.full_like(m, float("-inf"))], -1).contiguous(),
                    torch.stack([p.sum(-1), empty], -1).contiguous(),
                    torch.stack([torch.einsum("nhm,mhd->nhd", p, values[-1]), torch.full_like(q, float("nan"))], 2).contiguous())
    out = torch.empty(n, heads, dim, dtype=dtype, device=device)
    merge_normalized(out, sources, partials)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref.transpose(0, 1), atol=tol, rtol=tol)
