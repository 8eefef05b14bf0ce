"""Multi-LoRA on one GPU: W1 (Qwen2-7B shape, random weights) with 8 random rank-16 adapters on every
projection. Prints one JSON line per figure: each request a random adapter vs the same run without
LoRA (goal >= 0.85; with --paths or --ab-path per GANTRY_LORA_PATH), base-only requests on a
LoRA-enabled engine vs LoRA disabled (goal >= 0.97), and per projection the LoRA kernels' times beside the
base GEMM.
    python -m benchmarks.lora_bench [--ab-path | --paths augmented,augmented-k]
        [--kernels-only | --skip-kernels] [--num-requests 256]
        [--input-len 512] [--output-len 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import time

import torch

from benchmarks.throughput import make_workload, write_config

RANK, NUM_ADAPTERS = 16, 8
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_random_adapter(path: str, dims, rank: int, modules: tuple[str, ...], g: torch.Generator, std: float,
                         dtype: torch.dtype = torch.float32) -> str:
    """One PEFT directory of random lora_A / lora_B (normal, std) for `modules` of every layer, written with
    safetensors directly (no peft needed on the GPU host); lora_alpha = 2 * rank."""
    from safetensors.torch import save_file

    tensors = {}
    for layer in range(dims.num_layers):
        for m in modules:
            in_f, out_f = dims.shape(m)
            kind = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            name = f"base_model.model.model.layers.{layer}.{kind}.{m}"
            tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, in_f, generator=g) * std).to(dtype)
            tensors[f"{name}.lora_B.weight"] = (torch.randn(out_f, rank, generator=g) * std).to(dtype)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules)}, f)
    return path


def write_adapters(shape: dict, seed: int) -> list[str]:
    """NUM_ADAPTERS random rank-RANK adapters on every projection of `shape`, in bf16."""
    from engine.lora.adapter import ModelDims

    dims = ModelDims.from_hf(type("HF", (), dict(shape, head_dim=None)))
    g = torch.Generator().manual_seed(seed)
    return [write_random_adapter(tempfile.mkdtemp(prefix=f"gantry-lora{i}-"), dims, RANK, MODULES, g, 0.01,
                                 torch.bfloat16) for i in range(NUM_ADAPTERS)]


def run(model: str, prompts: list[list[int]], output_len: int, loras: list | None, cold: bool = False,
        **kwargs) -> float:
    """Output tokens/s of one offline generate() over every prompt (a fresh engine, freed after); cold: the
    warm-up runs no adapter, so each is read from disk and copied to its slot inside the timed run."""
    from engine import LLM, SamplingParams

    llm = LLM(model, load_format="dummy", **kwargs)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    # warm-up: kernels compiled and, as a server that has served each adapter once, every adapter resident (the
    # first 8 requests' adapters alone left about 3 of 8 to be read from disk inside the timed run)
    warm = [None] * 8 if loras is None or cold else list({lora.lora_int_id: lora for lora in loras}.values())
    llm.generate(prompts[: len(warm)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False,
                 lora_request=None if loras is None or cold else warm)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_tokens == len(prompts) * output_len, f"expected {len(prompts) * output_len} tokens, got {num_tokens}"
    llm.llm_engine.shutdown()
    del llm, outputs
    gc.collect()
    torch.cuda.empty_cache()
    return num_tokens / elapsed


def graph_ms(fn, reps: int = 20) -> float:
    """Milliseconds of one fn() replayed inside a CUDA graph (as decode runs): no launch overhead counted."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: Triton compiles outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 5 / reps


def _sgmv_figures(batch, slices: list, in_features: int, x: torch.Tensor, w: torch.Tensor,
                  y: torch.Tensor) -> dict:
    """The SGMV path: base GEMM, shrink (with its zeroed float32 output) and every slice's expand."""
    from engine.lora.layers import LoRALinear, LoRASlice
    from engine.lora.punica import expand_fused, shrink

    lin = LoRALinear([LoRASlice(m, off, size, 0) for m, off, size in slices], in_features, 0, False, NUM_ADAPTERS,
                     RANK, torch.bfloat16, x.device)
    lin.a_stack.normal_(std=0.01)
    lin.b_all.normal_(std=0.01)
    out = None
    if batch.shrink_out is not None:  # decode: the step's zeroed buffer, as the engine's (no memset per layer)
        out = batch.shrink_out[: x.shape[0], : lin.a_stack.shape[1]]
    t = shrink(batch, x, lin.a_stack, out)
    return {"shrink_ms": graph_ms(lambda: shrink(batch, x, lin.a_stack, out)),
            "expand_ms": graph_ms(lambda: expand_fused(batch, t, lin.b_all, y, lin.x_col, lin.block_n)),
            "total_ms": graph_ms(lambda: lin.apply(batch, x, torch.matmul(x, w.t(), out=y)))}


def _augmented_figures(batch, slices: list, in_features: int, x: torch.Tensor, w: torch.Tensor, mode: str) -> dict:
    """An augmented path's parts and whole layer. Mode k: the base GEMM through the weight's view of W_aug
    (base-only steps), t = x @ A_all^T, the masked [x, t], the one GEMM over W_aug. Mode n: the one GEMM over
    [W; A_all] giving [y, t], t masked in place, y += t @ B_all^T."""
    from torch import nn

    from engine.lora.augmented import AugmentedLoRALinear
    from engine.lora.layers import LoRASlice
    from gantry_kernels.lora import lora_augment, lora_mask_

    layer = nn.Module()
    layer.weight = nn.Parameter(w.clone(), requires_grad=False)
    aug = AugmentedLoRALinear([LoRASlice(m, off, size, 0) for m, off, size in slices], in_features, 0, False,
                              NUM_ADAPTERS, RANK, layer, mode)
    aug.a_all.normal_(std=0.01)
    aug.b_all.normal_(std=0.01)
    figures = {"base_gemm_view_ms": graph_ms(lambda: torch.nn.functional.linear(x, layer.weight)),
               "total_ms": graph_ms(lambda: aug.linear(batch, x, None)),
               "adapter_bytes": (aug.a_all.numel() + aug.b_all.numel()) * aug.w_aug.element_size()}
    if mode == "k":
        t = torch.mm(x, aug.a_all.t())
        x_aug = torch.empty(x.shape[0], aug.w_aug.shape[1], dtype=x.dtype, device=x.device)
        figures.update(shrink_ms=graph_ms(lambda: torch.mm(x, aug.a_all.t())),
                       mask_ms=graph_ms(lambda: lora_augment(x, t, batch.token_slots, aug.cols_per_slot, x_aug)),
                       gemm_ms=graph_ms(lambda: torch.nn.functional.linear(x_aug, aug.w_aug)))
    else:
        yt = torch.nn.functional.linear(x, aug.w_aug)
        y, t = yt[:, : aug.out_local], yt[:, aug.out_local :]
        figures.update(gemm_ms=graph_ms(lambda: torch.nn.functional.linear(x, aug.w_aug)),
                       mask_ms=graph_ms(lambda: lora_mask_(t, batch.token_slots, aug.cols_per_slot)),
                       expand_ms=graph_ms(lambda: y.addmm_(t, aug.b_all.t())))
    return figures


def kernel_figures(shape: dict, ab: bool) -> None:
    """Per layer type, the SGMV path's shrink and (all slices') expand beside the base GEMM, and with `ab` the
    augmented-K path's parts and both paths' whole layer, for a decode step of 256 tokens and a prefill of 8192
    (16 segments), 8 adapters, each timed inside a CUDA graph."""
    from engine.lora.adapter import ModelDims
    from engine.lora.manager import DECODE_TILE, PREFILL_TILE, tile_segments
    from engine.lora.punica import LoRABatch

    hf = type("HF", (), dict(shape, head_dim=None))
    d, dev = ModelDims.from_hf(hf), torch.device("cuda")
    q, kv, h, i = d.q_size, d.kv_size, d.hidden, d.intermediate
    layers = {"qkv_proj": ([("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)], h),
              "o_proj": ([("o_proj", 0, h)], q), "gate_up_proj": ([("gate_proj", 0, i), ("up_proj", i, i)], h),
              "down_proj": ([("down_proj", 0, h)], i)}
    for kind, num_tokens, num_segs in (("decode", 256, 256), ("prefill", 8192, 16)):
        slots = torch.randint(0, NUM_ADAPTERS, (num_segs,)).repeat_interleave(num_tokens // num_segs)
        perm = torch.argsort(slots, stable=True).to(torch.int32).to(dev)
        tile = DECODE_TILE if kind == "decode" else PREFILL_TILE
        seg_start, seg_slot = (torch.from_numpy(a).to(dev) for a in tile_segments(
            torch.bincount(slots, minlength=NUM_ADAPTERS).numpy(), tile))  # as the engine cuts them
        shrink_out = torch.zeros(num_tokens, 3 * RANK, device=dev) if kind == "decode" else None
        batch = LoRABatch(slots.to(torch.int32).to(dev), perm, seg_start, seg_slot, tile, True, shrink_out)
        for name, (slices, in_features) in layers.items():
            out_features = sum(size for _, _, size in slices)
            x = torch.randn(num_tokens, in_features, device=dev, dtype=torch.bfloat16)
            w = torch.randn(out_features, in_features, device=dev, dtype=torch.bfloat16)
            y = torch.empty(num_tokens, out_features, device=dev, dtype=torch.bfloat16)
            gemm = graph_ms(lambda x=x, w=w, y=y: torch.matmul(x, w.t(), out=y))
            sgmv = _sgmv_figures(batch, slices, in_features, x, w, y)
            line = {"figure": f"lora_kernel_{kind}_{name}", "num_tokens": num_tokens, "adapters": NUM_ADAPTERS,
                    "rank": RANK, "gemm_ms": round(gemm, 4), "shrink_ms": round(sgmv["shrink_ms"], 4),
                    "expand_ms": round(sgmv["expand_ms"], 4)}
            if ab:
                line["sgmv_total_ms"] = round(sgmv["total_ms"], 4)
                line["sgmv_lora_cost_ms"] = round(sgmv["total_ms"] - gemm, 4)
                for mode in ("k", "n"):
                    aug = _augmented_figures(batch, slices, in_features, x, w, mode)
                    line.update({f"aug_{mode}_{k}": v if k == "adapter_bytes" else round(v, 4) for k, v in aug.items()})
                    line[f"aug_{mode}_lora_cost_ms"] = round(aug["total_ms"] - gemm, 4)
            print(json.dumps(line), flush=True)
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ab-path", action="store_true",
                    help="GANTRY_LORA_PATH=augmented and sgmv against one no-LoRA baseline (--paths augmented,sgmv)")
    ap.add_argument("--paths", default=None,
                    help="comma-separated GANTRY_LORA_PATH values run against one no-LoRA baseline, the first the "
                    "default afterwards (augmented, augmented-k, sgmv)")
    ap.add_argument("--kernels-only", action="store_true",
                    help="only the per-projection kernel figures (both paths' parts; no engine runs)")
    ap.add_argument("--cold-adapters", action="store_true",
                    help="also a LoRA run whose warm-up loads no adapter: what reading each from disk costs")
    ap.add_argument("--skip-kernels", action="store_true", help="no per-projection kernel figures")
    ap.add_argument("--repeats", type=int, default=1,
                    help="no-LoRA and LoRA runs alternated this many times (fresh engines), then each path's median "
                    "ratio and spread: the no-LoRA baseline alone moved 3%% between runs of the same code")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats: must be >= 1, got {args.repeats}")
    if not torch.cuda.is_available():
        raise SystemExit("lora_bench needs a CUDA GPU")
    from engine.lora import LoRARequest
    from engine.lora.augmented import lora_path

    default_path = lora_path()  # GANTRY_LORA_PATH as given (a bad value stops here, before any work)
    shape = make_workload("w1", args.seed).shape
    if args.kernels_only:
        kernel_figures(shape, True)
        return
    model = write_config(shape, args.input_len + args.output_len)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, shape["vocab_size"]) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    adapters = [LoRARequest(f"adapter{i}", i + 1, p) for i, p in enumerate(write_adapters(shape, args.seed))]
    per_request = [rng.choice(adapters) for _ in prompts]
    lora_kwargs = {"enable_lora": True, "max_loras": NUM_ADAPTERS, "max_lora_rank": RANK}
    common = {"workload": "w1", "num_requests": args.num_requests, "adapters": NUM_ADAPTERS, "rank": RANK}
    paths = ("augmented", "sgmv") if args.ab_path else (default_path,)  # default first: a timeout leaves it
    if args.paths:
        paths = tuple(args.paths.split(","))
        for path in paths:
            os.environ["GANTRY_LORA_PATH"] = path
            lora_path()  # a bad value stops here, before any work
        default_path = paths[0]
    ratios: dict[str, list[float]] = {path: [] for path in paths}
    for repeat in range(args.repeats):
        base = run(model, prompts, args.output_len, None)
        for path in paths:
            os.environ["GANTRY_LORA_PATH"] = path  # read when the engine attaches LoRA (its processes inherit it)
            with_lora = run(model, prompts, args.output_len, per_request, **lora_kwargs)
            ratios[path].append(with_lora / base)
            print(json.dumps({"figure": "lora_random_adapter_vs_no_lora", "lora_path": path, "repeat": repeat,
                              **common, "no_lora_tok_s": round(base, 1), "lora_tok_s": round(with_lora, 1),
                              "ratio": round(with_lora / base, 4), "goal": 0.85}), flush=True)
    if args.repeats > 1:
        for path, values in ratios.items():
            print(json.dumps({"figure": "lora_random_adapter_vs_no_lora_median", "lora_path": path, **common,
                              "repeats": args.repeats, "median_ratio": round(statistics.median(values), 4),
                              "min_ratio": round(min(values), 4), "max_ratio": round(max(values), 4),
                              "goal": 0.85}), flush=True)
    os.environ["GANTRY_LORA_PATH"] = default_path
    base_on_lora = run(model, prompts, args.output_len, None, **lora_kwargs)
    print(json.dumps({"figure": "lora_base_requests_vs_lora_disabled", "lora_path": default_path, **common,
                      "lora_disabled_tok_s": round(base, 1), "lora_enabled_tok_s": round(base_on_lora, 1),
                      "ratio": round(base_on_lora / base, 4), "goal": 0.97}), flush=True)
    if args.cold_adapters:
        warm = statistics.median(ratios[default_path]) * base
        cold = run(model, prompts, args.output_len, per_request, cold=True, **lora_kwargs)
        num_tokens = len(prompts) * args.output_len
        print(json.dumps({"figure": "lora_cold_adapters_vs_no_lora", "lora_path": default_path, **common,
                          "lora_cold_tok_s": round(cold, 1), "ratio": round(cold / base, 4),
                          "load_ms_per_adapter": round((num_tokens / cold - num_tokens / warm) / NUM_ADAPTERS * 1e3, 1)}),
              flush=True)
    if not args.skip_kernels:
        kernel_figures(shape, args.ab_path or bool(args.paths))  # last: the throughput figures above are the goal's


if __name__ == "__main__":
    main()
