"""`python -m engine.serve` flags: vLLM's spelling, --config underneath explicit flags, and a
bad config refused with exit code 2 and one line naming the field (before any model loads)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine.cli_args import parse_configs
from engine.config import EngineConfig, ServerConfig
from engine.serve import main, serving_defaults
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


@pytest.mark.parametrize("given,served", [(None, 4608), (0, 0), (8192, 8192)])
def test_served_prompt_budget_beside_decodes(given: int | None, served: int) -> None:
    """Unset, a server sizes the prompt tokens a step beside decodes for latency (offline keeps the step budget);
    a value given, 0 included, is kept."""
    config = EngineConfig(max_prefill_tokens_while_decoding=given)
    assert serving_defaults(config).max_prefill_tokens_while_decoding == served


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


# ---- issue 22: --help, the API key from the environment, errors before "listening" -------------


def test_help_shows_defaults_and_never_none() -> None:
    from engine.cli_args import build_parser

    text = build_parser().format_help()
    assert "None" not in text
    options = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    for action in options:
        assert "(default: " in (action.help or ""), action.option_strings
    assert "SmolLM2-135M-Instruct" in text and "(default: auto)" in text


def test_api_key_from_gantry_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_API_KEY", "sk-env")
    assert ServerConfig().resolve_api_key_and_source() == ("sk-env", "GANTRY_API_KEY")
    assert ServerConfig(api_key="sk-flag").resolve_api_key_and_source() == ("sk-flag", "api_key")  # explicit wins
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert ServerConfig(api_key_env="MY_KEY").resolve_api_key() == "sk-mine"
    monkeypatch.setenv("GANTRY_API_KEY", "")
    assert ServerConfig().resolve_api_key_and_source() == (None, None)


@pytest.mark.parametrize("host,source,level,words", [
    ("0.0.0.0", None, "WARNING", "API key: none - anyone who can reach 0.0.0.0:8000 can use the API"),
    ("127.0.0.1", None, "INFO", "API key: none - anyone who can reach 127.0.0.1:8000"),
    ("0.0.0.0", "GANTRY_API_KEY", "INFO", "API key: required (from GANTRY_API_KEY)"),
])
def test_start_up_says_whether_a_key_is_required(host: str, source: str | None, level: str, words: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from engine.serve import log_api_key

    with caplog.at_level("INFO", logger="gantry.serve"):
        log_api_key(ServerConfig(host=host), source)
    assert [(r.levelname, words in r.getMessage()) for r in caplog.records] == [(level, True)]


def _listening(proc_output: str) -> bool:
    return "listening on" in proc_output or "Starting worker" in proc_output


def test_port_in_use_is_one_line_naming_the_port() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_serve("--host", "127.0.0.1", "--port", str(port), "--device", "cpu")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and lines == [
        f"engine.serve: config error: port: 127.0.0.1:{port} is already in use (another server?); "
        "choose a free port with --port"], r.stderr


@pytest.mark.parametrize("args,words", [
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: model path does not exist"),
    (["--max-model-len", "100000"], "max_model_len: 100000 exceeds the model's max_position_embeddings (8192)"),
    (["--tensor-parallel-size", "2", "--device", "cuda"], "needs 2 GPUs (one per rank), but 0 are visible"),
    (["--override-generation-config", '{"do_sample": true}'], "override_generation_config.do_sample: not applied"),
])
def test_config_errors_before_listening(args: list[str], words: str) -> None:
    from tests.server.conftest import free_port

    r = run_serve("--host", "127.0.0.1", "--port", str(free_port()), "--device", "cpu", *args)
    assert r.returncode == 2, r.stderr
    assert not _listening(r.stdout + r.stderr) and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr.strip().splitlines()[-1], r.stderr


def test_torchrun_rank_config_error_is_one_line_per_rank(tmp_path) -> None:
    """Each rank says what is wrong in one line and exits 2 (torchrun's own summary follows)."""
    from tests.ports import free_port

    # --standalone: the agent binds its own free rendezvous port; the API port is free too (not 8000)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "engine.serve", "--tensor-parallel-size", "2", "--device", "cpu",
                        "--host", "127.0.0.1", "--port", str(free_port()), "--model", str(tmp_path / "missing")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    rank_lines = [x for x in out.splitlines() if x.startswith("engine.serve: rank ")]
    # the first rank to fail ends the group: the other may be stopped (SIGTERM) before it prints
    assert 1 <= len(rank_lines) <= 2 and len({x.split(":")[1] for x in rank_lines}) == len(rank_lines), out
    for line in rank_lines:
        assert f"cannot load the model: {tmp_path / 'missing'}: model path does not exist" in line, out
    assert "exitcode  : 2" in out or "exitcode: 2" in out, out
    assert 'File "' + str(REPO / "engine") not in out, out  # no traceback through the engine
