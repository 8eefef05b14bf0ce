"""TP all-reduce of one layer's output, [tokens, hidden] bf16, on the GPUs of this host: NCCL against
the symmetric-memory kernels of engine/symm_all_reduce.py (one-shot, two-shot), each captured in a
CUDA graph of 32 back-to-back calls as a decode step runs them. Prints one JSON line per (algorithm,
hidden, tokens) with microseconds per call and the bus bandwidth; checks every result against the
sum of the ranks' inputs first.
    NCCL_NVLS_ENABLE=0 python -m benchmarks.allreduce_bench [--world-size 2] [--protos LL,LL128,Simple]
--protos re-runs the NCCL rows once per NCCL_PROTO value, each in a fresh process group.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALLS_PER_GRAPH = 32
REPLAYS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_graph(fn, x: torch.Tensor) -> float:
    """Microseconds per call of fn(x), CALLS_PER_GRAPH calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * CALLS_PER_GRAPH)


def worker(rank: int, world: int, port: int, args: dict) -> None:
    from engine.symm_all_reduce import SymmMemAllReduce

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    group = dist.group.WORLD
    algorithms = {"nccl": lambda t: dist.all_reduce(t, group=group)}
    if not args["nccl_only"]:
        for name in ("one_shot", "two_shot"):
            try:
                algorithms[name] = SymmMemAllReduce(group, device, name, max_bytes=args["max_bytes"])
            except Exception as e:  # report, keep measuring the rest
                if rank == 0:
                    print(json.dumps(dict(algorithm=name, error=repr(e))), flush=True)
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    for hidden in args["hidden"]:
        for tokens in args["tokens"]:
            x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16, generator=gen)
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x)
            expected = torch.stack(parts).float().sum(0)
            nbytes = x.numel() * x.element_size()
            for name, fn in algorithms.items():
                if name != "nccl" and nbytes > args["max_bytes"]:
                    continue
                y = x.clone()
                fn(y)
                err = (y.float() - expected).abs().max().item()
                ok = err <= 0.02 * expected.abs().max().item()
                us = time_graph(fn, x.clone())
                if rank == 0:
                    busbw = 2 * (world - 1) / world * nbytes / (us * 1e-6) / 1e9
                    print(json.dumps(dict(algorithm=name, proto=os.environ.get("NCCL_PROTO", "default"),
                                          hidden=hidden, tokens=tokens, bytes=nbytes, us=round(us, 2),
                                          busbw_gb_s=round(busbw, 1), correct=ok, max_err=err)), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=min(2, torch.cuda.device_count()))
    parser.add_argument("--hidden", default="3584,5120", help="W1 (Qwen2-7B) and W3 (Qwen2-32B) hidden sizes")
    parser.add_argument("--tokens", default="1,16,64,128,256,512,1024,2048")
    parser.add_argument("--max-bytes", type=int, default=32 << 20, help="symmetric buffer size")
    parser.add_argument("--protos", default="", help="also run NCCL alone under each of these NCCL_PROTO values")
    parser.add_argument("--nccl-only", action="store_true")
    args = parser.parse_args()
    if args.world_size < 2:
        raise SystemExit("--world-size: needs at least 2 GPUs")
    spec = dict(hidden=[int(h) for h in args.hidden.split(",")], tokens=[int(t) for t in args.tokens.split(",")],
                max_bytes=args.max_bytes, nccl_only=args.nccl_only)
    mp.spawn(worker, args=(args.world_size, free_port(), spec), nprocs=args.world_size, join=True)
    for proto in filter(None, args.protos.split(",")):
        cmd = [sys.executable, "-m", "benchmarks.allreduce_bench", "--world-size", str(args.world_size),
               "--hidden", args.hidden, "--tokens", args.tokens, "--nccl-only"]
        subprocess.run(cmd, env=dict(os.environ, NCCL_PROTO=proto), check=False)


if __name__ == "__main__":
    main()
