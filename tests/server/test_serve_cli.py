"""`python -m engine.serve` flags: vLLM's spelling, --config underneath explicit flags, and a
bad config refused with exit code 2 and one line naming the field (before any model loads)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine.config import EngineConfig, ServerConfig
from engine.serve import main, parse_configs
from tests.server.conftest import REPO


def test_flags_mirror_configs():
    engine, server, _ = parse_configs([
        "--model", "/models", "--served-model-name", "ds32b", "--dtype", "float16", "--max-model-len", "128000",
        "--tensor-parallel-size", "4", "-pp", "2", "--gpu-memory-utilization", "0.8", "--max-num-seqs", "32",
        "--max-num-batched-tokens", "4096", "--no-enable-prefix-caching", "--block-size", "32", "--enforce-eager",
        "--load-format", "safetensors", "--seed", "3", "--device", "cpu", "--num-kv-blocks", "100",
        "--kv-cache-memory-gib", "1.5", "--hf-overrides", '{"num_hidden_layers": 2}',
        "--host", "127.0.0.1", "--port", "9000", "--api-key", "k", "--metrics-require-key",
        "--max-waiting-requests", "7", "--shutdown-grace-s", "3", "--no-log-requests",
    ])
    assert engine == EngineConfig(
        model="/models", served_model_name="ds32b", dtype="float16", max_model_len=128000, tensor_parallel_size=4,
        pipeline_parallel_size=2, gpu_memory_utilization=0.8, max_num_seqs=32, max_num_batched_tokens=4096,
        enable_prefix_caching=False, block_size=32, enforce_eager=True, load_format="safetensors", seed=3,
        device="cpu", num_kv_blocks=100, kv_cache_memory_gib=1.5, hf_overrides={"num_hidden_layers": 2})
    assert server == ServerConfig(host="127.0.0.1", port=9000, api_key="k", metrics_require_key=True,
                                  max_waiting_requests=7, shutdown_grace_s=3.0, log_requests=False)


def test_defaults_serve_the_embedded_model():
    engine, server, _ = parse_configs([])
    assert engine == EngineConfig() and engine.model is None
    assert server == ServerConfig()


def test_config_file_under_explicit_flags(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("engine:\n  max_model_len: 4096\n  tensor_parallel_size: 2\n  enable_prefix_caching: false\n"
                    "server:\n  port: 8123\n  api_key_env: MY_KEY\n")
    engine, server, _ = parse_configs(["--config", str(path), "--max-model-len", "2048", "--port", "9999"])
    assert engine.max_model_len == 2048  # the flag wins
    assert engine.tensor_parallel_size == 2 and engine.enable_prefix_caching is False  # the file's
    assert server.port == 9999 and server.api_key_env == "MY_KEY"


def run_serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("args,field", [
    (["--block-size", "3"], "block_size"),
    (["--gpu-memory-utilization", "2"], "gpu_memory_utilization"),
    (["--dtype", "float8"], "dtype"),
    (["--port", "70000"], "port"),
    (["--max-waiting-requests", "0"], "max_waiting_requests"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size"),
    (["--max-model-len", "lots"], "--max-model-len"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--api-key-env", "GANTRY_SURELY_UNSET_VAR"], "api_key_env"),
    (["--api-key-file", "/nonexistent/key"], "api_key_file"),
])
def test_bad_config_exits_2_naming_the_field(args: list[str], field: str, capsys: pytest.CaptureFixture):
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], lines


def test_bad_config_process_exit_code(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("engine:\n  max_model_length: 4096\n")
    r = run_serve("--config", str(path))
    assert r.returncode == 2 and "engine.max_model_length" in r.stderr
    r = run_serve("--block-size", "3")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "engine.serve: config error: block_size: must be a power of two, got 3"]
