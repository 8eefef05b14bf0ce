"""Cost of one step's engine core -> client message (256 requests, one new token each, with and
without 5 logprobs): msgspec msgpack vs pickle, encode and decode, microseconds per message.
Usage: python benchmarks/msg_bench.py"""
from __future__ import annotations

import pickle
import time

from engine.core_messages import EngineCoreOutput, EngineCoreOutputs, SchedulerStats, TokenLogprobs, decoder_for, encoder


def make_step(num_requests: int, logprobs: int | None) -> EngineCoreOutputs:
    outs = []
    for i in range(num_requests):
        lps = None if logprobs is None else [TokenLogprobs(list(range(logprobs + 1)), [-0.5] * (logprobs + 1), 1)]
        outs.append(EngineCoreOutput(request_id=f"cmpl-{i:08x}-0", new_token_ids=[1000 + i], new_logprobs=lps))
    return EngineCoreOutputs(outputs=outs, timestamp=time.time(), stats=SchedulerStats(num_running=num_requests))


def per_call_us(fn, reps: int = 200) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    decoder = decoder_for(EngineCoreOutputs)
    for logprobs in (None, 5):
        step = make_step(256, logprobs)
        packed, pickled = encoder.encode(step), pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        print(f"256 requests, logprobs={logprobs}: "
              f"msgspec {len(packed)} B, encode {per_call_us(lambda: encoder.encode(step)):.0f} us, "
              f"decode {per_call_us(lambda: decoder.decode(packed)):.0f} us | "
              f"pickle {len(pickled)} B, encode {per_call_us(lambda: pickle.dumps(step, protocol=5)):.0f} us, "
              f"decode {per_call_us(lambda: pickle.loads(pickled)):.0f} us")


if __name__ == "__main__":
    main()
