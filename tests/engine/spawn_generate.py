"""A plain `python3 script.py` (no torchrun) that makes LLM(tensor_parallel_size=TP, pipeline_parallel_size=PP)
spawn its own ranks; used by test_spawn.py.

    spawn_generate.py MODEL TP PP OUT_JSON [greedy|greedy_async|twice|long] [TIMEOUT_S] [main|thread]

greedy: writes {"token_ids", "texts", "worker_pids", "exitcodes"} after an explicit shutdown;
greedy_async: the same with async scheduling (each rank feeds step t+1 from its step t's tokens).
twice: one LLM, deleted without shutdown, then a second one left to the interpreter's exit; writes
{"token_ids": [first's, second's], "worker_pids": [first's, second's]}.
GANTRY_TEST_DEVICE=cuda runs the ranks on GPUs (default cpu, gloo).
long: writes OUT_JSON.pids (rank 0 and its workers) once tokens come back, then generates for
minutes; a RankFailedError is written to OUT_JSON.error and the script exits 3. `thread` builds
the LLM in a thread that then ends (the getppid watch, not PR_SET_PDEATHSIG, must tie the workers).
"""
from __future__ import annotations

import json
import os
import sys
import threading

from engine import LLM, SamplingParams
from engine.errors import RankFailedError
from tests.conftest import prompts_of_lengths


def main() -> None:
    model, tp, pp, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    mode = sys.argv[5] if len(sys.argv) > 5 else "greedy"
    timeout_s = float(sys.argv[6]) if len(sys.argv) > 6 else 60.0
    where = sys.argv[7] if len(sys.argv) > 7 else "main"
    device = os.environ.get("GANTRY_TEST_DEVICE", "cpu")  # cuda: test_spawn_gpu.py on two GPUs
    kwargs = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, device=device, enable_prefix_caching=False,
                  distributed_timeout_s=timeout_s)
    if device == "cuda":
        kwargs["gpu_memory_utilization"] = 0.3
    if mode in ("greedy", "greedy_async"):
        llm = LLM(model, async_scheduling=mode == "greedy_async", **kwargs)
        prompts = prompts_of_lengths([1, 5, 17, 33, 64, 100, 177, 300])
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
        group = llm.llm_engine.worker_group
        llm.llm_engine.shutdown()
        with open(out_path, "w") as f:
            json.dump({"token_ids": [o.outputs[0].token_ids for o in outputs],
                       "texts": [o.outputs[0].text for o in outputs],
                       "worker_pids": [p.pid for p in group.procs.values()],
                       "exitcodes": [p.exitcode for p in group.procs.values()]}, f)
        return
    if mode == "twice":
        token_ids, worker_pids = [], []
        for _ in range(2):
            llm = LLM(model, **kwargs)
            output = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                  use_tqdm=False)
            token_ids.append(output[0].outputs[0].token_ids)
            worker_pids += [p.pid for p in llm.llm_engine.worker_group.procs.values()]
            del llm, output  # the first: its workers go with it; the second: at exit
        with open(out_path, "w") as f:
            json.dump({"token_ids": token_ids, "worker_pids": worker_pids}, f)
        return
    made: list[LLM] = []
    if where == "thread":  # the spawning thread ends before generation starts
        thread = threading.Thread(target=lambda: made.append(LLM(model, num_kv_blocks=512, **kwargs)))
        thread.start()
        thread.join()
    else:
        made.append(LLM(model, num_kv_blocks=512, **kwargs))
    engine = made[0].llm_engine
    params = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
    for i, prompt in enumerate(prompts_of_lengths([3, 7, 11, 13, 17, 19, 23, 29])):
        engine.add_request(str(i), prompt, params)
    pids = [os.getpid()] + [p.pid for p in engine.worker_group.procs.values()]
    num_steps = 0
    try:
        while engine.has_unfinished_requests():  # ~900 decode steps: far longer than the test waits
            engine.step()
            num_steps += 1
            if num_steps == 8:
                with open(out_path + ".pids", "w") as f:
                    json.dump(pids, f)
    except RankFailedError as e:
        with open(out_path + ".error", "w") as f:
            f.write(str(e))
        sys.exit(3)


if __name__ == "__main__":
    main()
