"""LLM(tensor_parallel_size=2) from a plain script on two GPUs (NCCL, CUDA graphs): greedy tokens of a
float32 checkpoint equal one GPU's with the symmetric-memory all-reduce and with NCCL alone, and a
worker killed mid-generate is a RankFailedError naming it within distributed_timeout_s (a one-shot
kernel waiting for the dead peer never returns, so the step's wait must give up by itself)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import TINY_ARCHS, prompts_of_lengths, write_tiny_checkpoint
from tests.engine.test_rank_failure import NOTICE_SLACK_S
from tests.engine.test_spawn import assert_gone, kill_rank_1_mid_generate, plain_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")]
TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory) -> tuple[str, list[list[int]]]:
    spec = dict(TINY_ARCHS["llama-untied"])
    path = write_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), spec.pop("arch"), **spec)
    llm = LLM(path, enable_prefix_caching=False, device="cuda", gpu_memory_utilization=0.3)
    outputs = llm.generate(prompts_of_lengths([1, 5, 17, 33, 64, 100, 177, 300]),
                           SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.shutdown()
    return path, [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("all_reduce", ["auto", "nccl"])
def test_tp2_on_gpus_matches_one_gpu(model_and_reference, tmp_path: Path, monkeypatch, all_reduce: str) -> None:
    model, reference = model_and_reference
    monkeypatch.setenv("GANTRY_TEST_DEVICE", "cuda")
    monkeypatch.setenv("GANTRY_ALL_REDUCE", all_reduce)
    out = tmp_path / "tp2.json"
    proc = plain_script([model, "2", "1", str(out), "greedy_async"])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    result = json.loads(out.read_text())
    assert result["token_ids"] == reference
    assert result["exitcodes"] == [0], output[-4000:]
    assert "Traceback" not in output and "terminate called" not in output, output[-4000:]
    if all_reduce == "auto":
        assert "over symmetric memory" in output, output[-4000:]  # the path under test was taken
    assert_gone(result["worker_pids"], 5)


def test_killed_worker_on_gpus_is_named(model_and_reference, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GANTRY_TEST_DEVICE", "cuda")
    error, noticed_s, output, pids = kill_rank_1_mid_generate(model_and_reference[0], 2, 1, tmp_path / "long.json",
                                                              TIMEOUT_S)
    assert "rank 1" in error, error
    assert f"rank 1 (pid {pids[1]}) was killed by SIGKILL" in output, output[-4000:]
    assert noticed_s <= TIMEOUT_S + NOTICE_SLACK_S, (noticed_s, error)
    assert_gone(pids, 10)
