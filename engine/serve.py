"""`python -m engine.serve`: the torchrun entry of every rank; rank 0 serves the OpenAI API.

Flags mirror EngineConfig and ServerConfig field by field (cli_args.py); `--config engine.yaml`
(written by the launcher) is read first and explicit flags override it. No --model serves the
embedded SmolLM2. A bad config (a taken port, a missing model, too long a context, more ranks than
GPUs) exits 2 with one line naming the field, before listening. Without torchrun,
tensor/pipeline parallel sizes > 1 make the engine core spawn the other ranks itself.
"""
from __future__ import annotations

from engine import startup  # noqa: I001 - first: start-up is timed from here

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from engine.cli_args import parse_configs
from engine.config import DEFAULT_API_KEY_ENV, ConfigError, EngineConfig, ServerConfig
from engine.errors import ModelLoadError
from engine.vllm_args import log_warnings

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Spinning threads took the
# cores from the server's own threads and from whatever else runs on a laptop (a decode step waits for
# every thread, so a busy machine made it 8x slower). An OMP_WAIT_POLICY set by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

logger = logging.getLogger("gantry.serve")


def planned_device(config: EngineConfig) -> Any:
    """The device the engine core will use, without touching it (no CUDA context in an API process)."""
    import torch

    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _nvidia_driver_loaded() -> bool:
    """Whether a CUDA device can be here, asked without importing torch."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


def frontend_device(config: EngineConfig) -> Any:
    """The device as the API process sees it: None where the engine core will run on CPU, decided
    without torch (205 MiB of RSS and seconds of start-up on 2 cores that the API process never
    needs there); else planned_device's. None only skips the API's early device checks: the core
    picks its device itself and makes them."""
    if config.device == "cpu" or (config.device == "auto" and not _nvidia_driver_loaded()):
        return None
    return planned_device(config)


def preflight(engine_config: EngineConfig) -> Any:
    """What can be checked before the server listens and before any weight is read: the torchrun
    group's size, the model's files, architecture and context length. Raises ConfigError or
    ModelLoadError; returns frontend_device's device (None: CPU, and torch not imported)."""
    from engine.model_config import resolve_model_config

    device = frontend_device(engine_config)
    if "WORLD_SIZE" in os.environ:  # a launcher's group: its size must be tp x pp
        from engine.parallel import check_world_size

        check_world_size(engine_config.tensor_parallel_size, engine_config.pipeline_parallel_size)
    elif device is not None or engine_config.world_size > 1:  # the engine core spawns the other ranks, one GPU each
        from engine.spawn import check_devices

        check_devices(engine_config)
    with startup.phase("model config"):
        model_config = resolve_model_config(engine_config, device)  # cached: the engine's call reuses the parse
    if int(os.environ.get("RANK", "0")) == 0:
        limit = model_config.default_max_tokens
        logger.info("requests without max_tokens: %s (generation config: %s)",
                    f"at most {limit} tokens" if limit else "up to the context length",
                    model_config.generation_config_source)
    return device


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_api_key(server_config: ServerConfig, source: str | None) -> None:
    """One line saying whether the API needs a key, and where the key came from."""
    where = f"{server_config.host}:{server_config.port}"
    if source is not None:
        logger.info("API key: required (from %s)", source)
    elif _is_loopback(server_config.host):
        logger.info("API key: none - anyone who can reach %s can use the API (set %s or --api-key-env to require one)",
                    where, DEFAULT_API_KEY_ENV)
    else:
        logger.warning("API key: none - anyone who can reach %s can use the API (set %s or --api-key-env to "
                       "require one)", where, DEFAULT_API_KEY_ENV)


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The listening socket, bound here so that a taken port is one clear line before any loading;
    reuse_port: several API processes share it (the kernel spreads the connections)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError("host", f"cannot listen on {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Sanic does: restart past TIME_WAIT
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError("port", f"{host}:{port} is already in use (another server?); "
                              "choose a free port with --port") from None
        if e.errno == errno.EACCES:
            raise ConfigError("port", f"no permission to listen on port {port} (ports below 1024 need root); "
                              "choose another with --port") from None
        raise ConfigError("host", f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def _start_ready_log(app: Any) -> None:
    """A listener that returns nothing: Sanic awaits what a listener returns, and SIGTERM while a
    listener still runs stopped the loop under it (a traceback, and a process that never exited)."""
    app.ctx.state.run_in_background(_log_when_ready(app))


async def _log_when_ready(app: Any) -> None:
    """One line, once /ready answers 200, with the time each start-up phase took."""
    state = app.ctx.state
    while state.engine.state in ("starting", "loading"):
        await asyncio.sleep(0.05)
    engine_ready = startup.since_start()
    if state.engine.info is not None:  # the core's device, described by the core (the API process has no torch)
        logger.info("device: %s", state.engine.info.device_description or state.engine.info.device)
    while state.engine.ready and not getattr(state, "ready", True):  # the API's text workers, if any
        await asyncio.sleep(0.05)
    if state.engine.ready:
        startup.record("text workers", startup.since_start() - engine_ready)
        logger.info("%s", startup.summary(startup.since_start(), state.engine.info.startup_phases))


# A served engine's prompt tokens a step while others decode, when unset (offline LLM: max_num_batched_tokens, for
# throughput). H200, Qwen2-7B shape: a 120K prompt prefilling beside 32 streams keeps their ITL p99 at 117-140 ms
# and its own TTFT at 1.18-1.19x alone (benchmarks/RESULTS.md, long context, sixteenth session).
SERVE_PREFILL_TOKENS_WHILE_DECODING = 4608


def serving_defaults(config: EngineConfig) -> EngineConfig:
    """What a server changes in an engine config left unset: a latency-sized prompt budget beside decodes."""
    if config.max_prefill_tokens_while_decoding is None:
        return dataclasses.replace(config, max_prefill_tokens_while_decoding=SERVE_PREFILL_TOKENS_WHILE_DECODING)
    return config


def serve(engine_config: EngineConfig, server_config: ServerConfig, log_level: str = "info") -> int:
    """Rank 0: the port, the engine core process (started first, it loads while we check), checks,
    then API process 0 (Sanic), which with api_server_count > 1 starts the other API processes."""
    engine_config = serving_defaults(engine_config)
    api_key, source = server_config.resolve_api_key_and_source()
    count = server_config.api_server_count
    # first: a taken port is known in milliseconds
    sock = bind_socket(server_config.host, server_config.port, reuse_port=count > 1)
    if server_config.port == 0:  # the kernel's choice: logged, and the one the other API processes bind
        server_config = dataclasses.replace(server_config, port=sock.getsockname()[1])
    from engine.core_proc import CoreAddresses, EngineCoreProcess, remove_dir
    from engine.server.api_procs import ApiProcesses, ReadyGroup, enable_multiprocess_metrics

    metrics_dir = enable_multiprocess_metrics() if count > 1 else None  # before prometheus_client is imported
    addresses, ipc_dir = CoreAddresses.new(count)
    # The engine core starts now: its interpreter, imports and model load overlap this process's
    # imports and checks below (RESULTS.md: start-up on CPU). A check that fails stops it.
    core = EngineCoreProcess(engine_config, addresses, log_level)
    _stop_on_signal_while_starting(core, [d for d in (ipc_dir, metrics_dir) if d is not None])
    core.start()
    try:
        with startup.phase("imports"):  # no torch here on CPU: tests/server/test_cpu_footprint.py
            from engine.server.app import create_app
        preflight(engine_config)
    except BaseException:
        core.kill()
        remove_dir(ipc_dir)
        if metrics_dir is not None:
            remove_dir(metrics_dir)
        raise
    log_api_key(server_config, source)
    app = create_app(engine_config, server_config, api_key, addresses=addresses, log_level=log_level, core=core)
    if count > 1:
        state = app.ctx.state
        state.children = ApiProcesses(engine_config, server_config, api_key, addresses, log_level)
        state.set_group(ReadyGroup(state.children.ready_events, 0))
        state.on_drain = state.children.drain
        app.register_listener(_start_api_processes, "after_server_start")
    app.register_listener(_start_ready_log, "after_server_start")
    try:
        app.run(sock=sock, single_process=True, access_log=False, motd=False)
    finally:
        remove_dir(ipc_dir)
        if metrics_dir is not None:
            remove_dir(metrics_dir)
    return app.ctx.state.exit_code


def _stop_on_signal_while_starting(core: Any, temp_dirs: list[str]) -> None:
    """Until Sanic takes SIGTERM and SIGINT over (then they drain): stop the engine core, remove the
    temporary directories and exit at once, with one line (SIGTERM: 0, as a stop while loading; SIGINT: 130).
    Python's default died by the signal (143) mid-import, leaving the directories behind."""
    from engine.core_proc import remove_dir

    def handler(signum: int, frame: Any) -> None:
        core.kill()
        for path in temp_dirs:
            remove_dir(path)
        name = signal.Signals(signum).name
        os.write(2, f"engine.serve: {name} while starting: stopped\n".encode())  # not print: it may be mid-write
        os._exit(0 if signum == signal.SIGTERM else 130)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


async def _start_api_processes(app: Any) -> None:
    """After the engine core started (its pid is theirs to watch)."""
    state = app.ctx.state
    state.children.start(state.engine.core_pid)
    state.run_in_background(_watch_api_processes(state))


async def _watch_api_processes(state: Any) -> None:
    """Stop everything if one of the other API processes dies."""
    while not state.children.stopping:
        await asyncio.sleep(0.5)
        dead = state.children.dead()
        if dead:
            logger.error("API process %s exited; stopping the server", ", ".join(map(str, dead)))
            state.on_fatal(1)
            return


def _worker_sigterm(signum: int, frame: Any) -> None:
    logger.info("SIGTERM: this rank stops when rank 0 has drained its requests and stops the group")


def main(argv: Sequence[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    who = f"engine.serve: rank {rank}" if "WORLD_SIZE" in os.environ else "engine.serve"
    try:
        engine_config, server_config, args = parse_configs(argv)
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if rank == 0:
            log_warnings(args.vllm_warnings)
        if rank > 0:
            # Ranks > 0 of a torchrun group run their shard of the model for rank 0's engine core,
            # which also tells them when to stop: SIGTERM (docker stop, scancel) only starts rank 0's drain.
            signal.signal(signal.SIGTERM, _worker_sigterm)
            preflight(engine_config)
            from engine.distributed import run_worker

            run_worker(engine_config)
            return 0
        return serve(engine_config, server_config, args.log_level)
    except ConfigError as e:
        print(f"{who}: config error: {e}", file=sys.stderr)
        return 2
    except ModelLoadError as e:
        print(f"{who}: cannot load the model: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading: no traceback
        print(f"{who}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
