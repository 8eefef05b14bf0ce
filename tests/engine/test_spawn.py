"""Multi-rank without torchrun (engine/spawn.py): a plain script's LLM(tensor_parallel_size=2) spawns
its ranks on CPU/gloo, generates what one process and a torchrun group generate, and never leaves
a worker behind: not after a normal exit, a killed worker, or a killed parent."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.config import ConfigError, EngineConfig
from engine.spawn import ensure_group
from tests.conftest import TINY_ARCHS, prompts_of_lengths, write_tiny_checkpoint
from tests.engine.test_distributed import REPO, dist_env, finish, torchrun
from tests.engine.test_rank_failure import NOTICE_SLACK_S, TIMEOUT_S, is_gone

SCRIPT = os.path.join(REPO, "tests", "engine", "spawn_generate.py")


def plain_script(args: list[str]) -> subprocess.Popen:
    """`python3 tests/engine/spawn_generate.py ...`: no torchrun, no RANK/WORLD_SIZE in its environment."""
    env = dist_env()
    for key in ("WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, SCRIPT, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the script exited ({proc.returncode}) before {path.name}:\n{proc.stdout.read()[-4000:]}")
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.2)
    time.sleep(0.1)  # written, not half-written


def assert_gone(pids: list[int], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not all(is_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in pids if not is_gone(p)]
    for pid in left:  # don't leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"orphan rank processes after {within_s} s: {left}"


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory) -> tuple[str, list[list[int]], list[str]]:
    spec = dict(TINY_ARCHS["llama-untied"])
    path = write_tiny_checkpoint(str(tmp_path_factory.mktemp("llama")), spec.pop("arch"), **spec)
    llm = LLM(path, enable_prefix_caching=False, device="cpu")
    outputs = llm.generate(prompts_of_lengths([1, 5, 17, 33, 64, 100, 177, 300]),
                           SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    return path, [o.outputs[0].token_ids for o in outputs], [o.outputs[0].text for o in outputs]


def run_greedy(model: str, tp: int, pp: int, out: Path, mode: str = "greedy") -> tuple[dict, str]:
    proc = plain_script([model, str(tp), str(pp), str(out), mode])
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    return json.loads(out.read_text()), output


@pytest.mark.slow
def test_plain_script_tp2_matches_tp1_and_torchrun(model_and_reference, tmp_path: Path) -> None:
    model, reference, reference_texts = model_and_reference
    result, output = run_greedy(model, 2, 1, tmp_path / "spawned.json")
    assert result["token_ids"] == reference
    assert result["texts"] == reference_texts
    finish(torchrun(2, [model, "2", "1", str(tmp_path / "torchrun.json")]))
    assert result["token_ids"] == json.loads((tmp_path / "torchrun.json").read_text())
    # released by rank 0's shutdown message: exit 0, nothing left running
    assert result["exitcodes"] == [0], output[-4000:]
    assert "rank 1: shut down by rank 0" in output
    assert_gone(result["worker_pids"], 5)


@pytest.mark.slow
def test_plain_script_tp2_with_async_scheduling_matches_tp1(model_and_reference, tmp_path: Path) -> None:
    """Step t+1 is scheduled and queued before step t's tokens reach rank 0: every rank fills the
    placeholders from the sampled tokens on its own device, broadcast from the first TP rank."""
    model, reference, _ = model_and_reference
    result, output = run_greedy(model, 2, 1, tmp_path / "spawned.json", "greedy_async")
    assert result["token_ids"] == reference
    assert result["exitcodes"] == [0], output[-4000:]
    assert_gone(result["worker_pids"], 5)


@pytest.mark.slow
def test_plain_script_pp2_matches_tp1(model_and_reference, tmp_path: Path) -> None:
    model, reference, _ = model_and_reference
    result, output = run_greedy(model, 1, 2, tmp_path / "spawned.json")
    assert result["token_ids"] == reference
    assert result["exitcodes"] == [0], output[-4000:]
    assert_gone(result["worker_pids"], 5)


@pytest.mark.slow
def test_deleted_llm_releases_its_workers(model_and_reference, tmp_path: Path) -> None:
    """An LLM dropped without shutdown() releases its ranks (so a second LLM in the process can spawn
    its own), and one still alive at exit is released too: every worker says so and exits."""
    model = model_and_reference[0]
    result, output = run_greedy(model, 2, 1, tmp_path / "twice.json", "twice")
    assert result["token_ids"][0] == result["token_ids"][1]
    assert output.count("rank 1: shut down by rank 0") == 2, output[-4000:]
    assert "did not exit" not in output and "at shutdown" not in output, output[-4000:]
    assert_gone(result["worker_pids"], 5)


def kill_rank_1_mid_generate(model: str, tp: int, pp: int, out: Path, timeout_s: float) -> tuple[str, float, str, list[int]]:
    """Run spawn_generate.py's `long` mode, SIGKILL rank 1 once tokens come back, and wait for the
    script's RankFailedError (exit 3): (its message, seconds from the kill, the script's output, pids)."""
    proc = plain_script([model, str(tp), str(pp), str(out), "long", str(timeout_s)])
    try:
        wait_for_file(Path(f"{out}.pids"), proc)
        pids = json.loads(Path(f"{out}.pids").read_text())
        os.kill(pids[1], signal.SIGKILL)  # [rank 0, rank 1, ...]
        killed_at = time.monotonic()
        error_file = Path(f"{out}.error")
        wait_for_file(error_file, proc, timeout=timeout_s + NOTICE_SLACK_S + 30)
        noticed_s = time.monotonic() - killed_at
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, output[-4000:]
    return error_file.read_text(), noticed_s, output, pids


@pytest.mark.slow
def test_killed_worker_is_named_in_the_parent(model_and_reference, tmp_path: Path) -> None:
    """pp3: SIGKILL the middle stage mid-generate; rank 0 raises RankFailedError naming rank 1 within
    distributed_timeout_s, and the last stage (still alive then) does not outlive the script."""
    error, noticed_s, output, pids = kill_rank_1_mid_generate(model_and_reference[0], 1, 3, tmp_path / "long.json",
                                                              TIMEOUT_S)
    # the last stage may have failed on rank 1 already and be silent too: "ranks 1, 2 stopped answering"
    assert re.search(r"ranks? [\d, ]*\b1\b[\d, ]* stopped answering", error), error
    assert noticed_s <= TIMEOUT_S + NOTICE_SLACK_S, (noticed_s, error)
    assert f"rank 1 (pid {pids[1]}) was killed by SIGKILL" in output, output[-4000:]  # the monitor's line
    assert_gone(pids, 5)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["main", "thread"])
def test_killed_parent_leaves_no_worker(model_and_reference, tmp_path: Path, where: str) -> None:
    """SIGKILL rank 0 mid-generate: its workers follow (PR_SET_PDEATHSIG from the main thread; the
    getppid watch when the LLM was built in a thread that has ended since)."""
    model = model_and_reference[0]
    out = tmp_path / "long.json"
    proc = plain_script([model, "2", "1", str(out), "long", "60", where])
    try:
        wait_for_file(Path(f"{out}.pids"), proc)
        pids = json.loads(Path(f"{out}.pids").read_text())
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_gone(pids[1:], 5)


@pytest.mark.slow
def test_script_without_main_guard_names_the_rank(model_and_reference, tmp_path: Path) -> None:
    """The spawned rank re-imports the main module; unguarded, it would build an LLM there: that rank
    fails at once, and rank 0 says which one and why instead of waiting for the store's timeout."""
    script = tmp_path / "unguarded.py"
    model = model_and_reference[0]
    script.write_text(f"from engine import LLM\nLLM({model!r}, tensor_parallel_size=2, device='cpu')\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=dist_env(), capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode != 0
    assert "RankFailedError: rank 1 (pid" in proc.stderr and "exited with code 1 before it started" in proc.stderr, \
        proc.stderr[-4000:]
    assert "under `if __name__ == '__main__':`" in proc.stderr
    assert time.monotonic() - started < 120


BROKEN_WORKER = """\
import logging, sys
import engine.distributed
if __name__ == "__mp_main__":  # the spawned rank re-imports this script: its start fails
    def broken(config, show_progress=False):
        logging.getLogger("gantry.engine").info("rank 1 reading shard 2 of 2")
        raise OSError("disk on fire")
    engine.distributed.run_worker = broken
if __name__ == "__main__":
    from engine import LLM
    LLM(sys.argv[1], tensor_parallel_size=2, device="cpu", distributed_timeout_s=float(sys.argv[2]))
"""


@pytest.mark.slow
def test_worker_failing_to_start_is_named_with_its_last_log_line(model_and_reference, tmp_path: Path) -> None:
    """Rank 0 waits for rank 1 in the store until distributed_timeout_s, then names it: its exit, its
    error and its last log line (instead of gloo's timeout alone)."""
    script = tmp_path / "broken_worker.py"
    script.write_text(BROKEN_WORKER)
    proc = subprocess.run([sys.executable, str(script), model_and_reference[0], str(TIMEOUT_S)], cwd=REPO,
                          env=dist_env(), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert re.search(r"RankFailedError: rank 1 \(pid \d+\) exited with code 1 while the engine started: OSError: "
                     r"disk on fire; its last log line: rank 1 reading shard 2 of 2", proc.stderr), proc.stderr[-4000:]


def test_nothing_spawned_for_one_rank_or_under_a_launcher(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ensure_group(EngineConfig(device="cpu")) is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun, Slurm, Kubernetes: the launcher started the ranks
    assert ensure_group(EngineConfig(tensor_parallel_size=2, device="cpu")) is None


def test_more_ranks_than_gpus_names_the_size(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size: .* needs 2 GPUs \(one per rank\), but 1 is visible"):
        ensure_group(EngineConfig(tensor_parallel_size=2, device="cuda"))
