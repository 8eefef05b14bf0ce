"""vLLM's `vllm serve` flags that are not config fields (engine/vllm_args.py, engine/cli_args.py): taken where they
mean what this engine does, taken with one warning where vLLM's v1 engine ignores them too, else refused with exit 2
and one line naming the field. They were argparse errors."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from engine.cli_args import parse_configs
from engine.config import EngineConfig, ServerConfig
from engine.serve import main
from tests.server.conftest import REPO

# vLLM's defaults, and the values this engine takes as they are: no config changes, no warning
TAKEN = ["--disable-log-stats", "--enable-chunked-prefill", "--swap-space", "4", "--tokenizer-mode", "auto",
         "--tokenizer-mode", "hf", "--max-seq-len-to-capture", "8192", "--distributed-executor-backend", "mp",
         "--uvicorn-log-level", "warning", "--trust-remote-code", "--seed", "0"]


def test_vllm_flags_at_their_defaults_change_nothing() -> None:
    engine, server, args = parse_configs(TAKEN)
    assert engine == EngineConfig(trust_remote_code=True) and server == ServerConfig()
    assert args.vllm_warnings == []


def test_num_gpu_blocks_override_and_max_logprobs() -> None:
    engine, _, _ = parse_configs(["--num-gpu-blocks-override", "64", "--max-logprobs", "5"])
    assert (engine.num_kv_blocks, engine.max_logprobs) == (64, 5)


@pytest.mark.parametrize("flag,log_requests", [("--disable-log-requests", False), ("--enable-log-requests", True),
                                               ("--no-log-requests", False)])
def test_log_requests_flags(flag: str, log_requests: bool) -> None:
    assert parse_configs([flag])[1].log_requests is log_requests


@pytest.mark.parametrize("args,words", [
    (["--swap-space", "16"], "swap_space=16.0: ignored, as vLLM's v1 engine ignores it"),
    (["--max-seq-len-to-capture", "32768"], "max_seq_len_to_capture=32768: ignored"),
    (["--disable-frontend-multiprocessing"], "--disable-frontend-multiprocessing: ignored"),
    (["--uvicorn-log-level", "debug"], "--uvicorn-log-level: the HTTP server is not uvicorn"),
])
def test_ignored_flags_give_one_warning(args: list[str], words: str) -> None:
    engine, server, parsed = parse_configs(args)
    assert engine == EngineConfig() and server == ServerConfig()
    assert len(parsed.vllm_warnings) == 1 and parsed.vllm_warnings[0].startswith(words), parsed.vllm_warnings


def test_warnings_are_logged_at_start(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine.serve.serve", lambda *a, **k: 0)
    with caplog.at_level(logging.WARNING, logger="gantry.config"):
        assert main(["--swap-space", "8"]) == 0
    assert [r.getMessage()[:24] for r in caplog.records if r.name == "gantry.config"] == ["swap_space=8.0: ignored,"]


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,field", [
    (["--revision", "main"], "revision"),
    (["--download-dir", "/models"], "download_dir"),
    (["--tokenizer-mode", "slow"], "tokenizer_mode"),
    (["--skip-tokenizer-init"], "skip_tokenizer_init"),
    (["--no-enable-chunked-prefill"], "enable_chunked_prefill"),
    (["--distributed-executor-backend", "ray"], "distributed_executor_backend"),
    (["--max-logprobs", "-1"], "max_logprobs"),
    (["--num-gpu-blocks-override", "64", "--num-kv-blocks", "32"], "num_gpu_blocks_override"),
])
def test_flags_this_engine_cannot_honour_exit_2_naming_the_field(args: list[str], field: str) -> None:
    r = run_serve(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"engine.serve: config error: {field}: "), r.stderr


def test_help_lists_vllm_flags() -> None:
    text = run_serve("--help").stdout
    for flag in ("--num-gpu-blocks-override", "--swap-space", "--disable-log-requests", "--enable-log-requests",
                 "--uvicorn-log-level", "--disable-frontend-multiprocessing", "--max-logprobs", "--revision"):
        assert flag in text, flag
