"""How close can the FP8 one-row GEMV get? Issue 14's TPOT line (FP8 <= 0.6x bf16) measured against a bound.

gantry_kernels/weight_gemv.py at its table config against variants of its loop over W1's four FP8 projections
(weights rotated out of L2 as a decode step finds them; each variant's best config over a small sweep):
- loads: the weights stream as int32 words through the same pipelined loop and are only xor-ed (no x, no
  dot): what the loop would take if its arithmetic were free;
- f16x2: the dot in packed halves, four words (16 e4m3 values) a PTX block (cvt.rn.f16x2.e4m3x2 and
  fma.rn.f16x2, summed in f16, then float32), x already in f16 pairs divided by its largest value, as a producer
  kernel (RMSNorm, SiLU-and-mul, the attention merge) would have to hand it over;
- f16x2_amax: the same dot with each program finding x's largest value and making the pairs itself.
Each variant's output is checked against float32 (x holds a 3,000 outlier the scaling must survive).
    python -m benchmarks.fp8_gemv_bound [--variants loads,f16x2,f16x2_amax]
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from benchmarks.fp8_bench import W1_LINEARS, emit
from benchmarks.quant_bench import copies_for, rotating_us
from engine.layers.quant.fp8 import quantize_rows
from gantry_kernels import weight_gemv as wg
from gantry_kernels.pdl import launch_kwargs, wait_prior

# $0 = the float32 sum of 4 words' 16 products: $1..$4 words of e4m3 values, $5..$12 x's f16x2 pairs (x0 x1),
# (x2 x3) of each word
DOT4 = tl.constexpr("""{
.reg .b16 l0, l1, l2, l3, h0, h1, h2, h3, sl, sh;
.reg .b32 a, t;
mov.b32 {l0, h0}, $1;
mov.b32 {l1, h1}, $2;
mov.b32 {l2, h2}, $3;
mov.b32 {l3, h3}, $4;
cvt.rn.f16x2.e4m3x2 t, l0;
mul.rn.f16x2 a, t, $5;
cvt.rn.f16x2.e4m3x2 t, h0;
fma.rn.f16x2 a, t, $6, a;
cvt.rn.f16x2.e4m3x2 t, l1;
fma.rn.f16x2 a, t, $7, a;
cvt.rn.f16x2.e4m3x2 t, h1;
fma.rn.f16x2 a, t, $8, a;
cvt.rn.f16x2.e4m3x2 t, l2;
fma.rn.f16x2 a, t, $9, a;
cvt.rn.f16x2.e4m3x2 t, h2;
fma.rn.f16x2 a, t, $10, a;
cvt.rn.f16x2.e4m3x2 t, l3;
fma.rn.f16x2 a, t, $11, a;
cvt.rn.f16x2.e4m3x2 t, h3;
fma.rn.f16x2 a, t, $12, a;
mov.b32 {sl, sh}, a;
add.f16 sl, sl, sh;
cvt.f32.f16 $0, sl;
}
""")


@triton.jit
def _split4(v):
    """[A, B, 4] -> four [A, B] (last index 0..3)."""
    a, b = tl.split(tl.reshape(v, [v.shape[0], v.shape[1], 2, 2]))  # a: indices 0 and 2, b: 1 and 3
    v0, v2 = tl.split(a)
    v1, v3 = tl.split(b)
    return v0, v1, v2, v3


@triton.jit
def _pair(lo, hi):
    """int32 f16x2 of two float32 tensors, lo in the low half."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _bound_kernel(
    x_ptr, xp_ptr, amax_ptr, w_ptr, ws_ptr, out_ptr,  # x [K] bf16; xp [K / 2] f16x2; w [N, K / 4] words; ws [N]
    N, KW, stride_wn,
    MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, NUM_STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """MODE 1: loads only; 2: f16x2 dot, x's largest value found here; 3: f16x2 dot on pairs made beforehand."""
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    num_t = KW // BLOCK_KW
    Q: tl.constexpr = BLOCK_KW // 4
    wait_prior(PDL)
    if MODE == 2:
        big = tl.zeros([BLOCK_KW * 4], dtype=tl.float32)
        for t in range(0, num_t):
            big = tl.maximum(big, tl.abs(tl.load(x_ptr + t * BLOCK_KW * 4 + tl.arange(0, BLOCK_KW * 4)).to(tl.float32)))
        amax = tl.max(big, axis=0)
        amax = tl.where(amax > 0, amax, 1.0)
    elif MODE == 3:
        amax = tl.load(amax_ptr)
    else:
        amax = 1.0
    inv = 1.0 / amax
    acc = tl.zeros([BLOCK_N, Q], dtype=tl.float32)  # a sum per 4 words
    acci = tl.zeros([BLOCK_N, BLOCK_KW], dtype=tl.int32)  # MODE 1's xor
    for t in tl.range(0, num_t, num_stages=NUM_STAGES):
        kw = t * BLOCK_KW + tl.arange(0, BLOCK_KW)
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + kw[None, :], mask=n_ok[:, None], other=0)
        if MODE == 1:
            acci ^= words
        else:
            if MODE == 2:
                xt = tl.reshape(tl.load(x_ptr + t * BLOCK_KW * 4 + tl.arange(0, BLOCK_KW * 4)).to(tl.float32) * inv,
                                [BLOCK_KW, 2, 2])
                lo, hi = tl.split(xt)  # [BLOCK_KW, 2]: (x0, x2), (x1, x3)
                pairs = _pair(lo, hi)  # [BLOCK_KW, 2]: (x0 x1), (x2 x3)
                pairs = tl.reshape(pairs, [Q, 4, 2])
            else:
                pairs = tl.reshape(tl.load(xp_ptr + t * BLOCK_KW * 2 + tl.arange(0, BLOCK_KW * 2)), [Q, 4, 2])
            pe, po = tl.split(pairs)  # [Q, 4]: each word's (x0 x1), (x2 x3)
            e0, e1, e2, e3 = _split4(tl.reshape(pe, [1, Q, 4]))
            o0, o1, o2, o3 = _split4(tl.reshape(po, [1, Q, 4]))
            w0, w1, w2, w3 = _split4(tl.reshape(words, [BLOCK_N, Q, 4]))
            shape: tl.constexpr = [BLOCK_N, Q]
            acc += tl.inline_asm_elementwise(
                DOT4, "=f,r,r,r,r,r,r,r,r,r,r,r,r",
                [w0, w1, w2, w3, tl.broadcast_to(e0, shape), tl.broadcast_to(o0, shape), tl.broadcast_to(e1, shape),
                 tl.broadcast_to(o1, shape), tl.broadcast_to(e2, shape), tl.broadcast_to(o2, shape),
                 tl.broadcast_to(e3, shape), tl.broadcast_to(o3, shape)],
                dtype=tl.float32, is_pure=True, pack=1)
    if MODE == 1:
        out = tl.sum(acci, axis=1).to(tl.float32)
    else:
        out = tl.sum(acc, axis=1) * amax * tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def prep_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, K] bf16 -> (f16x2 pairs int32 [K / 2] of x / amax, amax float32 [1])."""
    amax = x.float().abs().amax().clamp_min(1e-30).reshape(1)
    return (x.float() / amax).half().reshape(-1).view(torch.int32), amax


def call(mode: int, x: torch.Tensor, xp: torch.Tensor, amax: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor,
         cfg: tuple[int, int, int, int]) -> torch.Tensor:
    block_n, block_kw, num_warps, num_stages = cfg
    n, k = wq.shape
    out = torch.empty(1, n, device=x.device, dtype=x.dtype)
    words = wq.view(torch.int32)  # [N, K / 4]
    _bound_kernel[(1, triton.cdiv(n, block_n), 1)](
        x, xp, amax, words, ws, out, n, k // 4, words.stride(0), MODE=mode, BLOCK_N=block_n, BLOCK_KW=block_kw,
        NUM_STAGES=num_stages, num_warps=num_warps, **launch_kwargs(x.device))
    return out


MODES = {"loads": 1, "f16x2_amax": 2, "f16x2": 3}
# (BLOCK_N, BLOCK_KW words, num_warps, num_stages): 4-16 words a thread a tile
CONFIGS = [(bn, kw, nw, ns) for bn in (4, 8, 16, 32) for kw in (32, 64, 128) for nw in (1, 2, 4) for ns in (1, 4, 6)
           if 4 <= bn * kw // (32 * nw) <= 16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="loads,f16x2,f16x2_amax")
    args = parser.parse_args()
    torch.manual_seed(0)
    layer: dict[str, float] = {}
    for name, (n, k) in W1_LINEARS.items():
        copies = copies_for(n * k)
        ws = [quantize_rows(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x[0, 5] = 3000.0
        xp, amax = prep_x(x)
        ref = x.float() @ (ws[0][0].float() * ws[0][1][:, None]).t()
        cfg = wg.gemv_config(n, k, 1, wg.num_sms(x.device), 1)
        figures = {"weight_gemv": (rotating_us(lambda w: wg.weight_gemv(x, w[0], w[1], None, cfg), ws), cfg)}
        for variant in args.variants.split(","):
            mode, best = MODES[variant], (float("inf"), None)
            for c in CONFIGS:
                if (k // 4) % c[1]:
                    continue
                if mode != 1:
                    got = call(mode, x, xp, amax, ws[0][0], ws[0][1], c).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    if err > 1e-2:
                        raise SystemExit(f"{variant} {c} on {name}: relative error {err:.3g}")
                best = min(best, (rotating_us(lambda w, c=c: call(mode, x, xp, amax, w[0], w[1], c), ws), c))
            figures[variant] = best
        for variant, (us, c) in figures.items():
            layer[variant] = layer.get(variant, 0.0) + us
        emit("fp8_gemv_bound", layer=name, **{v: {"us": round(us, 2), "config": c} for v, (us, c) in figures.items()})
    emit("fp8_gemv_bound_layer", **{v: round(us, 2) for v, us in layer.items()})


if __name__ == "__main__":
    main()
