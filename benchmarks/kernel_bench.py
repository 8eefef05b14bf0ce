"""Kernel microbenchmark: paged decode attention's achieved GB/s against measured copy bandwidth.

Bytes = K/V pages read (each once) + query + output; copy bandwidth = bytes read + written by a large
device-to-device copy, measured in the same run. Also: bf16 matmul rate and the prefill kernel's
TFLOP/s for reference. `--sweep` also times launch variants and split counts. `--long` times both
kernels at long context instead (issue 12): one 8,192-token chunk of a 120K prompt at several offsets
(launch variants, TFLOP/s against the matmul rate and against torch SDPA on contiguous K/V), and one
decoding stream at 120K (split counts, % of copy bandwidth).

    python3 -m benchmarks.kernel_bench [--sweep] [--long]   (from the repository root)
"""
from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import torch
import triton.testing

from gantry_kernels import reference
from gantry_kernels.decode_attention import choose_num_splits, decode_attention
from gantry_kernels.cudnn_prefill import KEY_PIECES, chunk_attention, warmup
from gantry_kernels.prefill_attention import prefill_attention

BLOCK_SIZE = 16
HEAD_DIM = 128
DTYPE = torch.bfloat16
SHAPES = {"32q/8kv": (32, 8), "28q/4kv (Qwen2-7B)": (28, 4)}


def bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds over CUDA events (triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def bench_graph_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of CUDA-graph replays (no launch overhead: how the engine runs decode)."""
    return triton.testing.do_bench_cudagraph(fn, rep=300, return_mode="median")


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB, counting bytes read and written."""
    src = torch.randn(2**30 // 2, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    return 2 * 8192**3 / bench_ms(lambda: a @ b) / 1e9


def make_decode_batch(batch: int, context: int, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """Every sequence `context` tokens long, its pages scattered over the pool in random order."""
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM)  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    v_cache = torch.randn(shape, device="cuda", dtype=DTYPE)
    block_tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, num_heads, HEAD_DIM, device="cuda", dtype=DTYPE)  # [batch, num_heads, head_dim]
    return query, k_cache, v_cache, block_tables, seq_lens


def decode_bytes(batch: int, context: int, num_heads: int, num_kv_heads: int) -> int:
    kv = 2 * batch * context * num_kv_heads * HEAD_DIM
    q_and_out = 2 * batch * num_heads * HEAD_DIM
    return (kv + q_and_out) * torch.finfo(DTYPE).bits // 8


def check_decode(args: tuple[torch.Tensor, ...], **launch: int) -> float:
    """Relative error against the reference on the first 4 sequences (a benchmark of a wrong kernel is void)."""
    query, k_cache, v_cache, block_tables, seq_lens = args
    out = decode_attention(query, k_cache, v_cache, block_tables, seq_lens, HEAD_DIM**-0.5, **launch)[:4].float()
    ref = reference.decode_attention(query[:4], k_cache, v_cache, block_tables[:4], seq_lens[:4], HEAD_DIM**-0.5)
    return ((out - ref.float()).norm() / ref.float().norm()).item()


def time_decode(args: tuple[torch.Tensor, ...], graph: bool = False, **launch: int) -> float:
    query, k_cache, v_cache, block_tables, seq_lens = args
    timer = bench_graph_ms if graph else bench_ms
    return timer(lambda: decode_attention(query, k_cache, v_cache, block_tables, seq_lens, HEAD_DIM**-0.5, **launch))


def run_decode_table(copy_gbs: float) -> None:
    print(f"\ndecode attention, bf16, head_dim {HEAD_DIM}, block_size {BLOCK_SIZE}, shuffled pages;"
          " eager = launches timed with events, graph = CUDA-graph replays")
    print(f"{'shape':>20} {'batch':>6} {'context':>8} {'splits':>6} {'eager ms':>9} {'GB/s':>6} {'% copy':>7}"
          f" {'graph ms':>9} {'GB/s':>6} {'% copy':>7} {'rel err':>8}")
    for (name, (num_heads, num_kv_heads)), batch, context in itertools.product(SHAPES.items(), (64, 256), (1024, 4096, 16384)):
        args = make_decode_batch(batch, context, num_heads, num_kv_heads)
        nbytes = decode_bytes(batch, context, num_heads, num_kv_heads)
        err = check_decode(args)
        eager, graph = time_decode(args), time_decode(args, graph=True)
        splits = choose_num_splits(batch, num_kv_heads, context, args[0].device)
        row = f"{name:>20} {batch:>6} {context:>8} {splits:>6}"
        for ms in (eager, graph):
            gbs = nbytes / ms / 1e6
            row += f" {ms:>9.3f} {gbs:>6.0f} {100 * gbs / copy_gbs:>6.1f}%"
        print(f"{row} {err:>8.1e}")
        del args
        torch.cuda.empty_cache()


def run_sweep(copy_gbs: float) -> None:
    """Decode launch variants at batch 64 / context 4k, then split counts at every table size (graph timing)."""
    batch, context, (num_heads, num_kv_heads) = 64, 4096, SHAPES["32q/8kv"]
    args = make_decode_batch(batch, context, num_heads, num_kv_heads)
    nbytes = decode_bytes(batch, context, num_heads, num_kv_heads)
    results = []
    for block_n, num_warps, num_stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4)):
        launch = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages, num_splits=1)
        results.append((time_decode(args, graph=True, **launch), check_decode(args, **launch), launch))
    print(f"\nsweep: batch {batch}, context {context}, 32q/8kv, one split (best 6 of {len(results)})")
    for ms, err, launch in sorted(results, key=lambda r: r[0])[:6]:
        print(f"  {launch}  {ms:.3f} ms  {100 * nbytes / ms / 1e6 / copy_gbs:.1f}% of copy  err {err:.1e}")
    del args
    print("\nsweep: split count, graph ms (* = choose_num_splits)")
    for (name, (num_heads, num_kv_heads)), batch, context in itertools.product(SHAPES.items(), (64, 256), (1024, 4096, 16384)):
        args = make_decode_batch(batch, context, num_heads, num_kv_heads)
        chosen = choose_num_splits(batch, num_kv_heads, context, args[0].device)
        cells = [f"{n}{'*' if n == chosen else ''}: {time_decode(args, graph=True, num_splits=n):.3f}" for n in (1, 2, 3, 4, 8)]
        print(f"  {name:>20} batch {batch:>3} context {context:>5}  " + "  ".join(cells))
        del args
        torch.cuda.empty_cache()


def run_fp8_kv_decode(copy_gbs: float) -> None:
    """Decode attention over bf16 and FP8 pages at W1's heads (28q/4kv), batch 256: an FP8 page is half the
    bytes, but the loop takes as many steps at the same block_n, so wider blocks are timed too; "fp8-f16"
    widens the pages to fp16 (one cvt per pair) instead of bf16."""
    num_heads, num_kv_heads = SHAPES["28q/4kv (Qwen2-7B)"]
    print("\nFP8 KV decode: graph ms and % of copy bandwidth (of each page dtype's bytes), batch 256, 28q/4kv")
    for context in (512, 2048):
        args = make_decode_batch(256, context, num_heads, num_kv_heads)
        query, k_cache, v_cache, block_tables, seq_lens = args
        fp8 = (query, k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn), block_tables, seq_lens)
        kv_bytes = {"bf16": decode_bytes(256, context, num_heads, num_kv_heads)}
        kv_bytes["fp8"] = kv_bytes["bf16"] - 256 * context * num_kv_heads * HEAD_DIM * 2  # K and V at one byte
        for name, pages, extra in (("bf16", args, {}), ("fp8", fp8, {"f16_dot": False}),
                                   ("fp8-f16", fp8, {"f16_dot": True})):
            nbytes = kv_bytes[name.split("-")[0]]
            err = check_decode(pages, **extra)
            cells = []
            # one stage: the loads are not pipelined through shared memory as FP8, so the pages widen in
            # registers before the dot's layout change (an 8-bit V operand cannot use a transposing ldmatrix)
            sweep = itertools.product((64, 128, 256), (4, 8), (1, 2, 3)) if name != "bf16" else [(64, 4, 1), (64, 4, 3)]
            for block_n, warps, stages in sweep:
                try:
                    ms = time_decode(pages, graph=True, block_n=block_n, num_warps=warps, num_stages=stages, **extra)
                except Exception as e:  # out of shared memory or registers for this variant
                    print(f"    {block_n}/{warps}w/{stages}s: {type(e).__name__}")
                    continue
                cells.append((ms, f"{block_n}/{warps}w/{stages}s {ms:.3f} ({100 * nbytes / ms / 1e6 / copy_gbs:.0f}%)"))
            default = time_decode(pages, graph=True, **extra)
            best = sorted(cells)[:3]
            print(f"  context {context:>5} {name}: default {default:.3f} ms "
                  f"({100 * nbytes / default / 1e6 / copy_gbs:.0f}%), err {err:.1e}; best "
                  + ", ".join(c for _, c in best))
        del args, fp8
        torch.cuda.empty_cache()


def run_prefill(matmul: float, sweep: bool) -> None:
    """8 sequences of 2048 new tokens, no earlier context: causal FLOPs = 2 * 2 * H * D * sum(q_len^2 / 2)."""
    num_heads, num_kv_heads = SHAPES["32q/8kv"]
    num_seqs, q_len = 8, 2048
    _, k_cache, v_cache, block_tables, _ = make_decode_batch(num_seqs, q_len, num_heads, num_kv_heads)
    seq_lens = torch.full((num_seqs,), q_len, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(0, (num_seqs + 1) * q_len, q_len, dtype=torch.int32, device="cuda")
    query = torch.randn(num_seqs * q_len, num_heads, HEAD_DIM, device="cuda", dtype=DTYPE)
    flops = 4 * num_heads * HEAD_DIM * num_seqs * q_len * (q_len + 1) / 2
    variants = [{}]
    if sweep:
        variants += [dict(block_m=m, block_n=n, num_warps=w, num_stages=st)
                     for m, n, w, st in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))]
    print("\nprefill attention, 8 x 2048 new tokens, causal, 32q/8kv")
    for launch in variants:
        try:
            ms = bench_ms(lambda: prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                                    HEAD_DIM**-0.5, **launch))
        except Exception as e:  # out of shared memory for this variant
            print(f"  {launch or 'default'}: {type(e).__name__}")
            continue
        tflops = flops / ms / 1e9
        print(f"  {launch or 'default'}: {ms:.3f} ms, {tflops:.0f} TFLOP/s ({100 * tflops / matmul:.0f}% of matmul)")


LONG_SHAPE = (28, 4)  # Qwen2-7B heads
LONG_CONTEXT = 120_000
CHUNK = 8192


def causal_chunk_flops(num_heads: int, q_len: int, context: int) -> float:
    """QK^T and PV over the keys each new token sees: context + its own position within the chunk + 1."""
    return 4 * num_heads * HEAD_DIM * (q_len * context + q_len * (q_len + 1) / 2)


def run_long_prefill(matmul: float, sweep: bool) -> None:
    num_heads, num_kv_heads = LONG_SHAPE
    _, k_cache, v_cache, block_tables, _ = make_decode_batch(1, LONG_CONTEXT + CHUNK, num_heads, num_kv_heads)
    query = torch.randn(CHUNK, num_heads, HEAD_DIM, device="cuda", dtype=DTYPE)
    query_start_loc = torch.tensor([0, CHUNK], dtype=torch.int32, device="cuda")
    variants = [dict(pack_gqa=True), dict(pack_gqa=False)]
    if sweep:
        tiles = [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 32, 4, 2),
                 (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3)]
        variants = [dict(pack_gqa=p, block_m=m, block_n=n, num_warps=w, num_stages=st)
                    for p in (False, True) for m, n, w, st in tiles]
    print(f"\nlong prefill: one chunk of {CHUNK} new tokens after `context` earlier ones, 28q/4kv, bf16;"
          f" default = the engine's launch for max_query_len {CHUNK}")
    for context in (0, LONG_CONTEXT // 2, LONG_CONTEXT - CHUNK):
        seq_lens = torch.tensor([context + CHUNK], dtype=torch.int32, device="cuda")
        flops = causal_chunk_flops(num_heads, CHUNK, context)
        results = []
        for launch in [dict(max_query_len=CHUNK)] + variants:
            try:
                ms = bench_ms(lambda: prefill_attention(query, k_cache, v_cache, block_tables, query_start_loc,
                                                        seq_lens, HEAD_DIM**-0.5, **launch))
            except Exception as e:  # out of shared memory for this variant
                print(f"  context {context} {launch}: {type(e).__name__}")
                continue
            results.append((ms, launch))
        for ms, launch in sorted(results, key=lambda r: r[0])[:6] + [r for r in results if "max_query_len" in r[1]]:
            tflops = flops / ms / 1e9
            print(f"  context {context:>6} {launch}: {ms:.3f} ms, {tflops:.0f} TFLOP/s ({100 * tflops / matmul:.0f}% of matmul)")
    context = LONG_CONTEXT - CHUNK
    print(f"  short chunks {context} deep (the scheduler's while others decode): split-KV as chosen vs none")
    for q_len in (256, 662, 2048):
        seq_lens = torch.tensor([context + q_len], dtype=torch.int32, device="cuda")
        loc = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
        flops = causal_chunk_flops(num_heads, q_len, context)
        cells = []
        for splits in (None, 1):
            ms = bench_ms(lambda: prefill_attention(query[:q_len], k_cache, v_cache, block_tables, loc, seq_lens,
                                                    HEAD_DIM**-0.5, max_query_len=q_len, max_seq_len=context + q_len,
                                                    num_splits=splits))
            cells.append(f"{'chosen' if splits is None else 'one split'} {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s")
        print(f"    {q_len:>5} new tokens: " + ", ".join(cells))
    out = prefill_attention(query[:512], k_cache, v_cache, block_tables, torch.tensor([0, 512], dtype=torch.int32, device="cuda"),
                            torch.tensor([4096], dtype=torch.int32, device="cuda"), HEAD_DIM**-0.5, max_query_len=CHUNK)
    ref = reference.paged_attention(query[:512], k_cache, v_cache, block_tables, torch.tensor([0, 512], dtype=torch.int32, device="cuda"),
                                    torch.tensor([4096], dtype=torch.int32, device="cuda"), HEAD_DIM**-0.5)
    print(f"  long launch relative error vs reference: {((out.float() - ref.float()).norm() / ref.float().norm()).item():.1e}")
    print("  cuDNN path (gantry_kernels/cudnn_prefill.py: whole pieces of keys through cuDNN, the rest Triton) against the"
          " Triton launch alone:")
    warmup(k_cache, num_heads, DTYPE, 1.0, 1.0, CHUNK, LONG_CONTEXT + CHUNK)
    for context, q_len in ((KEY_PIECES[0], CHUNK), (LONG_CONTEXT // 2, CHUNK), (LONG_CONTEXT - CHUNK, CHUNK),
                           (LONG_CONTEXT - CHUNK, 2048), (LONG_CONTEXT - CHUNK, 1100), (KEY_PIECES[0] + 100, 1024)):
        seq_lens = torch.tensor([context + q_len], dtype=torch.int32, device="cuda")
        loc = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
        flops = causal_chunk_flops(num_heads, q_len, context)
        out = torch.empty_like(query[:q_len])
        ms = bench_ms(lambda: chunk_attention(query[:q_len], k_cache, v_cache, block_tables, loc, seq_lens,
                                              context + q_len, HEAD_DIM**-0.5, out))
        ref = prefill_attention(query[:q_len], k_cache, v_cache, block_tables, loc, seq_lens, HEAD_DIM**-0.5,
                                max_query_len=q_len, max_seq_len=context + q_len)
        triton_ms = bench_ms(lambda: prefill_attention(query[:q_len], k_cache, v_cache, block_tables, loc, seq_lens,
                                                       HEAD_DIM**-0.5, max_query_len=q_len, max_seq_len=context + q_len))
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        print(f"    {q_len:>5} new tokens {context:>6} deep: cuDNN {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s, Triton "
              f"{triton_ms:.3f} ms {flops / triton_ms / 1e9:.0f}; relative difference {err:.1e}")
    # what flash attention reaches on this GPU: torch SDPA, contiguous K/V, square causal, heads expanded
    n = 32768
    q = torch.randn(1, num_heads, n, HEAD_DIM, device="cuda", dtype=DTYPE)
    k, v = torch.randn_like(q), torch.randn_like(q)
    ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    tflops = causal_chunk_flops(num_heads, n, 0) / ms / 1e9
    print(f"  torch SDPA causal {n} tokens, contiguous: {ms:.3f} ms, {tflops:.0f} TFLOP/s ({100 * tflops / matmul:.0f}% of matmul)")


def run_long_decode(copy_gbs: float) -> None:
    num_heads, num_kv_heads = LONG_SHAPE
    print("\nlong decode: graph ms and % of copy bandwidth by split count (* = choose_num_splits)")
    for batch, context in ((1, LONG_CONTEXT), (4, LONG_CONTEXT // 4), (32, 8192)):
        args = make_decode_batch(batch, context, num_heads, num_kv_heads)
        nbytes = decode_bytes(batch, context, num_heads, num_kv_heads)
        chosen = choose_num_splits(batch, num_kv_heads, context, args[0].device)
        cells = []
        for n in sorted({chosen, 16, 32, 64, 128, 256}):
            for block_n, warps in ((64, 4), (128, 8)):
                ms = time_decode(args, graph=True, num_splits=n, block_n=block_n, num_warps=warps)
                cells.append(f"{n}{'*' if n == chosen and block_n == 64 else ''}/{block_n}/{warps}w: {ms:.3f} ({100 * nbytes / ms / 1e6 / copy_gbs:.0f}%)")
        print(f"  batch {batch:>3} context {context:>6} err {check_decode(args):.1e}\n    " + "\n    ".join(cells))
        del args
        torch.cuda.empty_cache()


def run_one_stream(copy_gbs: float) -> None:
    """One decoding stream at W1's heads (28q/4kv) and short contexts, the case of a one-stream TPOT: every split
    count and two token blocks (graph replays, the merge included). The engine captures its graphs with the split
    count of max_model_len, so short contexts leave most splits empty."""
    num_heads, num_kv_heads = SHAPES["28q/4kv (Qwen2-7B)"]
    print("\none stream, 28q/4kv: graph µs by split count / block_n (* = choose_num_splits at that context)")
    for context in (640, 1024, 2048, 8192):
        args = make_decode_batch(1, context, num_heads, num_kv_heads)
        chosen = choose_num_splits(1, num_kv_heads, context, args[0].device)
        cells = []
        for n in (1, 2, 4, 8, 16, 32, 64, 128):
            for block_n in (32, 64):
                us = 1e3 * time_decode(args, graph=True, num_splits=n, block_n=block_n)
                cells.append(f"{n}{'*' if n == chosen else ''}/{block_n}: {us:.1f}")
        print(f"  context {context:>5} err {check_decode(args, num_splits=32, block_n=32):.1e}  " + "  ".join(cells))
        del args
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time launch variants and split counts")
    parser.add_argument("--long", action="store_true", help="long-context prefill chunk and decode instead")
    parser.add_argument("--fp8-kv", action="store_true", help="decode over bf16 and FP8 pages (W1 heads) instead")
    parser.add_argument("--one-stream", action="store_true", help="one stream at short contexts (W1 heads) instead")
    opts = parser.parse_args()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs()
    matmul = matmul_tflops()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"copy bandwidth (read + write): {copy_gbs:.0f} GB/s; bf16 matmul 8192^3: {matmul:.0f} TFLOP/s")
    if opts.fp8_kv:
        run_fp8_kv_decode(copy_gbs)
        return
    if opts.one_stream:
        run_one_stream(copy_gbs)
        return
    if opts.long:
        run_long_decode(copy_gbs)
        run_long_prefill(matmul, opts.sweep)
        return
    if opts.sweep:
        run_sweep(copy_gbs)
    run_decode_table(copy_gbs)
    run_prefill(matmul, opts.sweep)


if __name__ == "__main__":
    main()
