"""Run under torchrun: rank 0 generates greedily through the offline API and writes the token
ids as JSON; every other rank serves as a worker. Used by test_distributed.py."""
from __future__ import annotations

import json
import os
import sys

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.distributed import run_worker
from tests.conftest import prompts_of_lengths


def main() -> None:
    model, tp, pp, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    lanes = int(sys.argv[5]) if len(sys.argv) > 5 else None
    kwargs = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, device="cpu", enable_prefix_caching=False,
                  pipeline_parallel_lanes=lanes, distributed_timeout_s=60)
    if int(os.environ.get("RANK", "0")) != 0:
        run_worker(EngineConfig(model=model, **kwargs))
        return
    llm = LLM(model, **kwargs)
    prompts = prompts_of_lengths([1, 5, 17, 33, 64, 100, 177, 300])
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    with open(out_path, "w") as f:
        json.dump([o.outputs[0].token_ids for o in outputs], f)
    llm.llm_engine.shutdown()


if __name__ == "__main__":
    main()
