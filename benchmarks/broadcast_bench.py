"""SchedulerOutput send cost per step at 256 running requests, under torchrun on gloo.

Rank 0 times what MultiprocExecutor.submit spends before running its own stage (pickle.dumps +
ControlChannel.send_to_workers) and, separately, until every send has completed; workers time
recv + unpickle. Steps: decode (256 cached requests, one new token each) and prefill (a few new
512-token requests beside the running ones).
Usage: torchrun --nproc-per-node 4 benchmarks/broadcast_bench.py [--steps 300] [--new-requests 4]
"""
from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time
import uuid

import torch
import torch.distributed as dist

from engine.distributed import ControlChannel
from engine.outputs import CachedRequestData, NewRequestData, RequestSamplingParams, SchedulerOutput
from engine.parallel import init_distributed

BLOCK_SIZE = 16


def sampling(num_prompt_tokens: int) -> RequestSamplingParams:
    """What engine.scheduler.request_sampling_params sends for a plain sampled request."""
    return RequestSamplingParams(
        temperature=0.7, top_k=0, top_p=0.95, min_p=0.0, seed=None, presence_penalty=0.0, frequency_penalty=0.0,
        repetition_penalty=1.0, has_penalties=False, min_tokens=0, stop_token_ids=[], eos_token_ids=[2],
        logprobs=None, prompt_logprobs=None, num_prompt_tokens=num_prompt_tokens)


def decode_step(req_ids: list[str], step: int) -> SchedulerOutput:
    """Every running request gets one token; one in BLOCK_SIZE crosses into a new page."""
    so = SchedulerOutput()
    for i, rid in enumerate(req_ids):
        num_computed = 600 + step
        new_blocks = [10_000 + i * 64 + step // BLOCK_SIZE] if (num_computed + i) % BLOCK_SIZE == 0 else []
        so.scheduled_cached_reqs.append(CachedRequestData(rid, [1000 + (i + step) % 30000], new_blocks, num_computed))
        so.num_scheduled_tokens[rid] = 1
    return so


def prefill_step(req_ids: list[str], num_new: int, prompt_len: int, step: int) -> SchedulerOutput:
    """num_new requests arrive with prompt_len-token prompts while the others decode."""
    so = decode_step(req_ids[: len(req_ids) - num_new], step)
    g = torch.Generator().manual_seed(step)
    for j in range(num_new):
        rid = f"cmpl-{uuid.uuid4().hex}-0"
        tokens = torch.randint(3, 32000, (prompt_len,), generator=g).tolist()
        blocks = list(range(50_000 + j * 64, 50_000 + j * 64 + -(-prompt_len // BLOCK_SIZE)))
        so.scheduled_new_reqs.append(NewRequestData(rid, tokens, blocks, 0, sampling(prompt_len)))
        so.num_scheduled_tokens[rid] = prompt_len
    so.finished_req_ids = [f"cmpl-{uuid.uuid4().hex}-0" for _ in range(num_new)]
    return so


def summary(seconds: list[float]) -> str:
    us = sorted(s * 1e6 for s in seconds)
    return (f"median {statistics.median(us):7.1f} us  p90 {us[int(0.9 * (len(us) - 1))]:7.1f} us  "
            f"mean {statistics.fmean(us):7.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--running", type=int, default=256, help="running requests per step")
    parser.add_argument("--steps", type=int, default=300, help="timed steps of each kind")
    parser.add_argument("--new-requests", type=int, default=4, help="new requests in a prefill step")
    parser.add_argument("--prompt-len", type=int, default=512)
    args = parser.parse_args()
    world_size = int(os.environ["WORLD_SIZE"])
    state = init_distributed(world_size, 1, torch.device("cpu"), 60.0)
    channel = ControlChannel(state, 60.0)
    req_ids = [f"cmpl-{uuid.uuid4().hex}-0" for _ in range(args.running)]
    ack = torch.zeros(1)
    kinds = {"decode": lambda s: decode_step(req_ids, s),
             "prefill": lambda s: prefill_step(req_ids, args.new_requests, args.prompt_len, s)}
    for kind, make in kinds.items():
        outputs = [make(s) for s in range(args.steps + 20)]  # built before timing: the scheduler's work, not ours
        send, complete, recv, size = [], [], [], 0
        for step, so in enumerate(outputs):
            dist.barrier(group=state.cpu_group)  # every rank idle, as at the start of an engine step
            if state.rank == 0:
                start = time.perf_counter()
                payload = pickle.dumps(so)
                channel.send_to_workers(payload)
                sent = time.perf_counter()
                channel.wait_sent()
                done = time.perf_counter()
                if step >= 20:  # the first steps warm up gloo's pairs and the allocator
                    send.append(sent - start)
                    complete.append(done - start)
                size = len(payload)
            else:
                start = time.perf_counter()
                pickle.loads(channel.recv_from_driver())
                if step >= 20:
                    recv.append(time.perf_counter() - start)
            dist.all_reduce(ack, group=state.cpu_group)
        if state.rank == 0:
            print(f"{world_size} ranks, {kind:7s} ({len(outputs[0].num_scheduled_tokens)} requests, "
                  f"{size / 1024:.1f} KiB pickled): pickle+send {summary(send)} | until sent {summary(complete)}",
                  flush=True)
        elif state.rank == world_size - 1:
            time.sleep(0.2)  # after rank 0's line
            print(f"{world_size} ranks, {kind:7s} rank {state.rank} barrier to unpickled {summary(recv)}", flush=True)
        dist.barrier(group=state.cpu_group)
        time.sleep(0.3)
    channel.heartbeat.stop()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
