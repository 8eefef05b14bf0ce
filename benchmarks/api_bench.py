"""What the API processes alone can carry: the real server (HTTP, tokenizer, output processor, SSE)
in front of an engine core whose executor returns a token at once (the scheduler and block manager
are real, no model runs). Served output tok/s here is the ceiling the front end puts on any GPU.

    python -m benchmarks.api_bench [--num-prompts 256] [--output-len 256] [--api-server-count 1]
    python -m benchmarks.api_bench --step-ms 16     # a step takes 16 ms, as W1 decode on an H200
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from engine.config import EngineConfig
from engine.core_build import CoreBuild
from engine.outputs import ModelRunnerOutput, SchedulerOutput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_S = float(os.environ.get("GANTRY_FAKE_STEP_S", "0"))


class InstantExecutor:
    """Samples token 42 + (step % 7) for every request that finishes its prompt, after STEP_S."""

    def __init__(self) -> None:
        self.prompt_len: dict[str, int] = {}
        self.pending: list[ModelRunnerOutput] = []
        self.step = 0

    def submit(self, so: SchedulerOutput) -> None:
        for new in so.scheduled_new_reqs:
            self.prompt_len[new.req_id] = len(new.prompt_token_ids)
        computed = {r.req_id: r.num_computed_tokens for r in so.scheduled_new_reqs}
        computed.update({r.req_id: r.num_computed_tokens for r in so.scheduled_cached_reqs})
        ids = [rid for rid, n in so.num_scheduled_tokens.items() if computed[rid] + n >= self.prompt_len.get(rid, 0)]
        for rid in so.finished_req_ids:
            self.prompt_len.pop(rid, None)
        self.step += 1
        self.pending.append(ModelRunnerOutput(ids, [42 + self.step % 7] * len(ids)))

    def collect(self) -> ModelRunnerOutput:
        if STEP_S:
            time.sleep(STEP_S)
        return self.pending.pop(0)

    def shutdown(self) -> None:
        pass


def instant_core(config: EngineConfig) -> CoreBuild:
    import torch

    from engine.block_manager import BlockManager
    from engine.core_build import config_eos_token_ids
    from engine.core_messages import CoreInfo
    from engine.engine_core import EngineCore
    from engine.model_config import resolve_model_config
    from engine.scheduler import Scheduler

    mc = resolve_model_config(config, torch.device("cpu"))
    num_blocks = 65536
    scheduler = Scheduler(BlockManager(num_blocks, config.block_size, True), config.max_num_seqs, 8192,
                          sorted(config_eos_token_ids(mc)), 1, False, mc.max_model_len)
    info = CoreInfo(model_name=mc.served_model_name, architecture=mc.architecture, max_model_len=mc.max_model_len,
                    vocab_size=mc.hf_config.vocab_size, num_total_blocks=num_blocks, block_size=config.block_size,
                    max_num_seqs=config.max_num_seqs, default_max_tokens=mc.default_max_tokens, device="cpu",
                    world_size=1)
    return CoreBuild(EngineCore(scheduler, InstantExecutor()), info, mc, torch.device("cpu"))


SERVE = """
import sys
from engine.serve import main
import engine.server.app as app_module
from benchmarks.api_bench import instant_core
create_app = app_module.create_app
app_module.create_app = lambda *a, **k: create_app(*a, **{**k, "core_factory": instant_core})
sys.exit(main(sys.argv[1:]))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--step-ms", type=float, default=0.0)
    p.add_argument("--port", type=int, default=18777)
    args = p.parse_args()
    env = {**os.environ, "GANTRY_FAKE_STEP_S": str(args.step_ms / 1000), "PYTHONPATH": REPO}
    server = subprocess.Popen([sys.executable, "-c", SERVE, "--device", "cpu", "--max-model-len", "2048",
                               "--max-num-seqs", "256", "--port", str(args.port), "--host", "127.0.0.1",
                               "--no-log-requests", "--max-waiting-requests", "100000",
                               "--api-server-count", str(args.api_server_count)], cwd=REPO, env=env)
    try:
        return subprocess.run([sys.executable, "-m", "benchmarks.serve", "--base-url", f"http://127.0.0.1:{args.port}",
                               "--num-prompts", str(args.num_prompts), "--random-input-len", str(args.input_len),
                               "--random-output-len", str(args.output_len), "--vocab-size", "500"],
                              cwd=REPO, env=env).returncode
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


if __name__ == "__main__":
    sys.exit(main())
