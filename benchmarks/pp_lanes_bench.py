"""Pipeline-parallel throughput with two batches in flight (pipeline_parallel_lanes=2) vs one, on
CPU/gloo under torchrun, with dummy weights big enough that compute dominates.

Driver (no torchrun): python benchmarks/pp_lanes_bench.py --tp 1 --pp 2 --lanes 1 2 --repeats 2
runs torchrun once per (lanes, repeat), interleaved, and prints tokens/s and the ratio to lanes=1.
Rank 0 also reports where its time went: its own stage (submit), waiting for tokens (collect), rest.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(path: str, args: argparse.Namespace) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": max(args.tp, args.hidden // 256), "vocab_size": args.vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def prompts_of_lengths(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    """Random token-id prompts (no tokenizer: dummy weights)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def timed(stats: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            stats[key] += time.perf_counter() - start
    return wrapper


def run_worker_timed(config: Any) -> None:
    """run_worker, timing where a worker waits: for rank 0's batch, the previous stage's activations,
    and rank 0 taking the tokens (last stage); prints one JSON line for the last rank."""
    from engine.distributed import ControlChannel, run_worker
    from engine.model_runner import ModelRunner

    stats = {"recv_batch": 0.0, "recv_activations": 0.0, "send_tokens": 0.0}
    ControlChannel.recv_from_driver = timed(stats, "recv_batch", ControlChannel.recv_from_driver)
    ControlChannel.send_result = timed(stats, "send_tokens", ControlChannel.send_result)
    ModelRunner._recv_intermediate = timed(stats, "recv_activations", ModelRunner._recv_intermediate)
    run_worker(config)
    if int(os.environ["RANK"]) == int(os.environ["WORLD_SIZE"]) - 1:
        print(json.dumps({"rank": int(os.environ["RANK"]), **stats}), flush=True)


def run_rank(args: argparse.Namespace) -> None:
    """Under torchrun: rank 0 generates and prints one JSON line; the others are workers."""
    from engine import LLM, SamplingParams
    from engine.config import EngineConfig

    model = tempfile.mkdtemp(prefix="pp-lanes-")
    write_config(model, args)
    kwargs = {"tensor_parallel_size": args.tp, "pipeline_parallel_size": args.pp, "device": "cpu", "load_format": "dummy",
                  "enable_prefix_caching": False, "pipeline_parallel_lanes": args.lanes, "num_kv_blocks": 2048,
                  "distributed_timeout_s": 300}
    if int(os.environ["RANK"]) != 0:
        run_worker_timed(EngineConfig(model=model, **kwargs))
        return
    llm = LLM(model, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts_of_lengths([args.prompt_len] * 4, vocab=args.vocab, seed=1), params, use_tqdm=False)
    executor = llm.llm_engine.executor
    stats = {"submit": 0.0, "collect": 0.0}
    executor.submit = timed(stats, "submit", executor.submit)
    executor.collect = timed(stats, "collect", executor.collect)
    prompts = prompts_of_lengths([args.prompt_len] * args.requests, vocab=args.vocab)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({"rank": 0, "lanes": llm.llm_engine.num_lanes, "tokens_per_s": num_tokens / elapsed, "seconds": elapsed,
                      "submit_s": stats["submit"], "collect_s": stats["collect"],
                      "other_s": elapsed - stats["submit"] - stats["collect"]}), flush=True)
    llm.llm_engine.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(args: argparse.Namespace, argv: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=REPO)
    results: dict[int, list[dict]] = {lanes: [] for lanes in args.lanes}
    for repeat in range(args.repeats):
        for lanes in args.lanes:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.tp * args.pp}",
                   "--master-addr=127.0.0.1", f"--master-port={free_port()}", os.path.abspath(__file__), *argv,
                   "--rank-mode", "--lanes", str(lanes)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
            reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode or len(reports) != 2:
                sys.exit(f"lanes={lanes} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            result, last = sorted(reports, key=lambda r: r["rank"])
            results[lanes].append(result)
            print(f"repeat {repeat} lanes={lanes}: {result['tokens_per_s']:.1f} tok/s ({result['seconds']:.2f} s; rank 0: "
                  f"own stage {result['submit_s']:.2f} s, waiting for tokens {result['collect_s']:.2f} s, "
                  f"other {result['other_s']:.2f} s; rank {last['rank']} waiting: for batches {last['recv_batch']:.2f} s, "
                  f"activations {last['recv_activations']:.2f} s, sending tokens {last['send_tokens']:.2f} s)", flush=True)
    base = statistics.median(r["tokens_per_s"] for r in results[args.lanes[0]])
    for lanes, rs in results.items():
        tps = statistics.median(r["tokens_per_s"] for r in rs)
        print(f"tp{args.tp} pp{args.pp} lanes={lanes}: median {tps:.1f} tok/s, x{tps / base:.2f} vs lanes={args.lanes[0]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--lanes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank-mode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_mode:
        args.lanes = args.lanes[-1]
        run_rank(args)
        return
    argv = [a for a in sys.argv[1:]]
    if "--lanes" in argv:  # the driver passes one lanes value per run
        i = argv.index("--lanes")
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        del argv[i:j]
    drive(args, argv)


if __name__ == "__main__":
    main()
