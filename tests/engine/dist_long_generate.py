"""Run under torchrun by test_rank_failure.py: every rank writes its pid to $GANTRY_TEST_DIR/rank<r>.pid;
rank 0 generates (greedy, long outputs) until it is stopped, and writes rank0.generating once
the first tokens are back; a rank that returns normally writes rank<r>.exit0 (the test expects none).

Usage: torchrun ... -m tests.engine.dist_long_generate MODEL TP PP TIMEOUT_S
"""
from __future__ import annotations

import logging
import os
import sys

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.distributed import run_worker
from tests.conftest import prompts_of_lengths


def mark(name: str) -> None:
    with open(os.path.join(os.environ["GANTRY_TEST_DIR"], name), "w") as f:
        f.write(str(os.getpid()))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tp, pp, timeout_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    rank = int(os.environ["RANK"])
    mark(f"rank{rank}.pid")
    kwargs = {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "device": "cpu", "enable_prefix_caching": False,
                  "distributed_timeout_s": timeout_s, "num_kv_blocks": 512}
    if rank != 0:
        run_worker(EngineConfig(model=model, **kwargs))
    else:
        llm = LLM(model, **kwargs)
        engine = llm.llm_engine
        params = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
        for i, prompt in enumerate(prompts_of_lengths([3, 7, 11, 13, 17, 19, 23, 29])):
            engine.add_request(str(i), prompt, params)
        num_steps = 0
        while engine.has_unfinished_requests():  # ~900 decode steps: far longer than the test waits
            engine.step()
            num_steps += 1
            if num_steps == 8:
                mark("rank0.generating")
        engine.shutdown()
    mark(f"rank{rank}.exit0")


if __name__ == "__main__":
    main()
