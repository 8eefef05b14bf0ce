"""benchmarks/long_context.py on CPU (--shape tiny): every part's figure line from one run (the
engine's step loop with per-token stamps, chunked prefill beside decoding streams, transformers'
prefill in a subprocess), and a bad flag refused by name."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.step_trace import percentile

REPO = Path(__file__).resolve().parents[2]


def run_bench(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path),
           "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "benchmarks.long_context", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0


@pytest.mark.slow
def test_tiny_run_prints_every_figure(tmp_path: Path) -> None:
    # 1500-token prompt in 256-token chunks: the long prompt of the mixed part takes
    # several steps, and the streams decode between them
    proc = run_bench(["--shape", "tiny", "--prompt-len", "1500", "--max-model-len", "4096", "--decode-tokens", "8",
                      "--max-num-batched-tokens", "256", "--short-prompt-len", "32", "--parts", "alone,four,mixed,hf"],
                     tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    figures = {f["figure"]: f for f in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    setup = figures["long_context_setup"]
    assert setup["device"] == "cpu" and "--prompt-len" in setup["argv"]
    assert figures["long_context_engine"]["max_num_batched_tokens"] == 256
    alone = figures["long_context_alone"]
    assert alone["prompt_len"] == 1500 and alone["ttft_s"] > 0 and alone["decode_tokens"] == 8 and alone["tpot_ms"] > 0
    four = figures["long_context_four"]
    assert four["prompt_len"] == 375 and len(four["ttft_s"]) == 4 and all(t > 0 for t in four["ttft_s"])
    assert four["wall_to_all_first_tokens_s"] == pytest.approx(max(four["ttft_s"]), abs=0.05)
    mixed = figures["long_context_mixed"]
    assert mixed["streams"] == 32 and mixed["preemptions"] == 0
    assert mixed["steps_during_prefill"] >= 1500 // 256  # chunked: one step could not hold the prompt
    assert mixed["stream_tokens_during_prefill"] >= 32 and mixed["itl_gaps"] >= 32  # the streams kept decoding
    assert 0 < mixed["itl_p50_ms"] <= mixed["itl_p99_ms"] <= mixed["itl_max_ms"]
    assert mixed["long_ttft_s"] > 0 and mixed["ttft_ratio_vs_alone"] == pytest.approx(
        mixed["long_ttft_s"] / alone["ttft_s"], rel=0.01)
    hf = figures["long_context_hf_prefill"]
    assert hf["prompt_len"] == 1500 and hf["hf_prefill_s"] > 0
    versus = figures["long_context_vs_hf"]
    assert versus["ratio"] == pytest.approx(alone["ttft_s"] / hf["hf_prefill_s"], rel=0.01)


def test_bad_flags_are_named(tmp_path: Path) -> None:
    proc = run_bench(["--shape", "tiny", "--parts", "alone,prefill"], tmp_path)
    assert proc.returncode != 0 and "--parts: unknown 'prefill'" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_bench(["--shape", "tiny", "--prompt-len", "5000", "--max-model-len", "4096"], tmp_path)
    assert proc.returncode != 0 and "--max-model-len 4096" in proc.stderr and "Traceback" not in proc.stderr


def test_driver_aborts_an_id_used_again() -> None:
    """The mixed part runs once per budget with the same stream ids: a stream that finished (or was aborted and
    reported) in one run and was added again is aborted by the next drain, not left decoding to max_tokens."""
    from benchmarks.step_trace import Driver

    class Engine:
        def __init__(self) -> None:
            self.live: set[str] = set()
            self.aborted: list[str] = []

        def add_request(self, request_id, prompt, params) -> None:
            self.live.add(request_id)

        def abort_request(self, request_ids) -> None:
            self.aborted += request_ids
            self.live -= set(request_ids)

        def has_unfinished_requests(self) -> bool:
            return bool(self.live)

        def step(self) -> list:
            return []

    engine = Engine()
    d = Driver(engine)
    d.add("stream-0", [1, 2, 3], 8)
    d.finished.add("stream-0")  # as step() records a finished (or aborted) output
    engine.live.clear()
    d.add("stream-0", [1, 2, 3], 8)
    d.drain(["stream-0"])
    assert engine.aborted == ["stream-0"] and not engine.live
