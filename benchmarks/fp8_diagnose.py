"""Where FP8 loses top-1 agreement on the embedded SmolLM2 (#14): one float32 transformers model, FP8
fake-quantized per experiment (the same e4m3 values and scales as the engine: per-row weights, per-token
activations, per-layer K/V pages), teacher-forced top-1 against the float32 model, overall and on positions
whose float32 top-2 logit margin exceeds 0.1 / 0.5 / 1.0. bf16 vs float32 beside it as the noise floor.
Measured on the 2-core CPU, 954 positions (--num-seqs 6), agreement with float32: W8A8 0.900 (2,544 positions:
0.899), W8 only 0.930, A8 only 0.942, q/k/v/o only 0.947, MLP only 0.926, down_proj only 0.944; 3 / 4 / 5
mantissa bits without range limits 0.904 / 0.952 / 0.981 (the 3-bit mantissa, not e4m3's range, costs it);
KV pages 0.962 (K only 0.943, V only 0.983, amax scales 0.951); bf16 0.977. W8A8 on margin > 0.5: 0.975.
--smooth: K and V pages stored minus a per-(layer, KV head, channel) mean measured on held-out text
(SageAttention's K smoothing: q . mean is the same for every key of a query, so softmax drops it; V's mean would
come back as an o_proj bias): K only 0.939 -> 0.964, K and V 0.960 -> 0.952 (2026-12-04, 954 positions).
    python -m benchmarks.fp8_diagnose [--num-seqs 16 --seq-len 160 --per-layer --smooth]
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fake_rows(t: torch.Tensor) -> torch.Tensor:
    """float [..., K] through e4m3 with one amax / 448 scale per row (per token / per output channel)."""
    scale = (t.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(1e-12)
    return (t / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * scale


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """float rounded to `bits` explicit mantissa bits with unlimited exponent range: e4m3 is bits=3
    plus saturation at 448 and subnormals; bits=7 is bf16."""
    mant, exp = torch.frexp(t.float())  # t = mant * 2**exp, |mant| in [0.5, 1)
    return torch.ldexp(torch.round(mant * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), exp)


def fake_tensor(t: torch.Tensor, scale: float) -> torch.Tensor:
    """float through e4m3 with one per-tensor scale (the FP8 KV pages)."""
    return (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).float().mul(scale).to(t.dtype)


class Plan:
    """What one experiment quantizes: linears (layer, proj) -> (weights, activations), and K / V pages;
    mantissa: instead of e4m3, round weights and activations to that many mantissa bits (no range limit)."""

    def __init__(self, linears: Callable[[int, str], tuple[bool, bool]] = lambda i, p: (False, False),
                 kv: str = "", kv_scales: list[tuple[float, float]] | None = None, mantissa: int = 0,
                 kv_means: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None, collect: bool = False):
        self.linears, self.kv, self.kv_scales, self.mantissa = linears, kv, kv_scales, mantissa
        self.kv_means = kv_means  # layer -> (K mean, V mean) [Hkv, D], subtracted before e4m3 and added back
        self.collect = collect  # add K and V up per channel into KV_SUMS


PLAN = Plan()
KV_AMAX: list[list[float]] = []
KV_SUMS: dict[int, list] = {}  # layer -> [sum of K [Hkv, D], sum of V, tokens], while PLAN.collect


def install(model: torch.nn.Module) -> None:
    """Wrap every decoder linear and the attention function so that PLAN decides what runs in FP8."""
    import transformers.models.llama.modeling_llama as llama

    for i, layer in enumerate(model.model.layers):
        for proj in PROJS:
            mod = getattr(layer.self_attn, proj, None) or getattr(layer.mlp, proj)
            w_fp8 = fake_rows(mod.weight.data.float()).to(mod.weight.dtype)

            def forward(x: torch.Tensor, mod=mod, w_fp8=w_fp8, i=i, proj=proj) -> torch.Tensor:
                qw, qa = PLAN.linears(i, proj)
                if not (qw or qa):
                    return torch.nn.functional.linear(x, mod.weight)
                if PLAN.mantissa:
                    xf, w = round_mantissa(x, PLAN.mantissa), round_mantissa(mod.weight, PLAN.mantissa)
                else:
                    xf, w = fake_rows(x.float()) if qa else x.float(), (w_fp8 if qw else mod.weight).float()
                return (xf @ w.t()).to(x.dtype)  # float32 accumulation

            mod.forward = forward
    sdpa = llama.ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, q, k, v, *args, **kwargs):  # k, v: [B, Hkv, T, D] after rotary
        i = module.layer_idx
        while len(KV_AMAX) <= i:
            KV_AMAX.append([0.0, 0.0])
        KV_AMAX[i] = [max(KV_AMAX[i][0], k.abs().max().item()), max(KV_AMAX[i][1], v.abs().max().item())]
        if PLAN.collect:
            sums = KV_SUMS.setdefault(i, [0.0, 0.0, 0])
            sums[0], sums[1], sums[2] = sums[0] + k[0].sum(1), sums[1] + v[0].sum(1), sums[2] + k.shape[2]
        ks, vs = PLAN.kv_scales[i] if PLAN.kv_scales else (1.0, 1.0)
        mk, mv = ((m[None, :, None, :] for m in PLAN.kv_means[i]) if PLAN.kv_means else (0.0, 0.0))
        if "k" in PLAN.kv:
            k = fake_tensor(k - mk, ks) + mk
        if "v" in PLAN.kv:
            v = fake_tensor(v - mv, vs) + mv
        return sdpa(module, q, k, v, *args, **kwargs)

    llama.ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    model.config._attn_implementation = "sdpa"


def logits_of(model: torch.nn.Module, seqs: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(torch.tensor([s])).logits[0, :-1].float() for s in seqs])  # [positions, vocab]


def scores(logits: torch.Tensor, ref: torch.Tensor, margin: torch.Tensor) -> dict[str, float]:
    same = logits.argmax(-1) == ref.argmax(-1)
    top1 = ref.argmax(-1, keepdim=True)
    # how far the experiment moves the logits: RMS over the vocabulary, and the float32 top-1's lead
    # over the float32 runner-up (what decides a flip)
    second = ref.scatter(-1, top1, float("-inf")).argmax(-1, keepdim=True)
    lead = (logits.gather(-1, top1) - logits.gather(-1, second)).squeeze(-1)
    out = {"all": round(same.float().mean().item(), 4),
           "logit_rms_delta": round((logits - ref).pow(2).mean(-1).sqrt().mean().item(), 4),
           "margin_abs_delta_mean": round((lead - margin).abs().mean().item(), 4)}
    for m in (0.1, 0.5, 1.0):
        keep = margin > m
        out[f"margin>{m}"] = round(same[keep].float().mean().item(), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=160)
    parser.add_argument("--per-layer", action="store_true", help="also W8A8 in one decoder layer at a time")
    parser.add_argument("--only", default="", help="comma-separated experiment names to run (default: all)")
    parser.add_argument("--smooth", action="store_true",
                        help="also K / V pages minus their per-channel means, measured on the next --num-seqs "
                        "sequences (fewer where the corpus ends)")
    parser.add_argument("--mantissa-sweep", action="store_true",
                        help="also weights and activations rounded to 3, 4, 5 mantissa bits without range limits")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from benchmarks.fp8_accuracy import token_sequences
    from engine.model_config import default_model_path

    path = default_model_path()
    seqs = token_sequences(path, args.num_seqs, args.seq_len)

    def load(dtype: torch.dtype) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    dtype=dtype).eval()

    model = load(torch.float32)
    install(model)
    ref = logits_of(model, seqs)
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]

    def report(name: str, logits: torch.Tensor) -> None:
        print(json.dumps({"experiment": name, "positions": len(ref), **scores(logits, ref, margin)}), flush=True)

    for m in (0.1, 0.5, 1.0):
        print(json.dumps({"share_of_positions_with_margin>": m, "share": round((margin > m).float().mean().item(), 4)}))
    print(json.dumps({"k_amax_per_layer": [round(k, 2) for k, _ in KV_AMAX],
                      "v_amax_per_layer": [round(v, 2) for _, v in KV_AMAX]}))
    calib = [(k / FP8_MAX, v / FP8_MAX) for k, v in KV_AMAX]  # amax of these very sequences: an upper bound
    attn, mlp = set(PROJS[:4]), set(PROJS[4:])
    experiments: list[tuple[str, Plan]] = [
        ("w8a8_all", Plan(lambda i, p: (True, True))),
        ("w8_only", Plan(lambda i, p: (True, False))),
        ("a8_only", Plan(lambda i, p: (False, True))),
        ("w8a8_attn_qkvo", Plan(lambda i, p: (p in attn,) * 2)),
        ("w8a8_mlp", Plan(lambda i, p: (p in mlp,) * 2)),
        ("w8a8_down_only", Plan(lambda i, p: (p == "down_proj",) * 2)),
        ("w8a8_qkv_only", Plan(lambda i, p: (p in ("q_proj", "k_proj", "v_proj"),) * 2)),
        ("kv_fp8_scale1", Plan(kv="kv")),
        ("kv_fp8_k_only_scale1", Plan(kv="k")),
        ("kv_fp8_v_only_scale1", Plan(kv="v")),
        ("kv_fp8_amax_scales", Plan(kv="kv", kv_scales=calib)),
    ]
    if args.smooth:
        PLAN.__dict__.update(Plan(collect=True).__dict__)
        held_out = token_sequences(path, args.num_seqs, args.seq_len, first_seq=args.num_seqs, at_most=True)
        logits_of(model, held_out)
        means = {i: (k / n, v / n) for i, (k, v, n) in KV_SUMS.items()}
        experiments += [("kv_fp8_smoothed", Plan(kv="kv", kv_means=means)),
                        ("kv_fp8_k_only_smoothed", Plan(kv="k", kv_means=means)),
                        ("kv_fp8_v_only_smoothed", Plan(kv="v", kv_means=means))]
    if args.mantissa_sweep:
        experiments += [(f"mantissa{b}_weights_and_activations", Plan(lambda i, p: (True, True), mantissa=b))
                        for b in (3, 4, 5)]
    only = list(filter(None, args.only.split(",")))  # also the order to run them in
    if only:
        experiments = sorted((e for e in experiments if e[0] in only), key=lambda e: only.index(e[0]))
    for name, plan in experiments:
        PLAN.__dict__.update(plan.__dict__)
        report(name, logits_of(model, seqs))
    if args.per_layer:
        for layer in range(len(model.model.layers)):
            PLAN.__dict__.update(Plan(lambda i, p, layer=layer: (i == layer,) * 2).__dict__)
            report(f"w8a8_layer{layer}", logits_of(model, seqs))
    PLAN.__dict__.update(Plan().__dict__)
    del model
    if only and "bf16_vs_fp32" not in only:
        return
    report("bf16_vs_fp32", logits_of(load(torch.bfloat16), seqs))


if __name__ == "__main__":
    main()
