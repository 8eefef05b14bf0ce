"""`python -m engine.serve`: the torchrun entry of every rank; rank 0 serves the OpenAI API.

Flags mirror EngineConfig and ServerConfig field by field (vLLM's spelling: --max-model-len);
`--config engine.yaml` (written by the launcher) is read first and explicit flags override it.
No --model serves the embedded SmolLM2. A bad config exits 2 with one line naming the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from engine.config import ConfigError, EngineConfig, ServerConfig, load_config_file

logger = logging.getLogger("gantry.serve")

# vLLM's short spellings, and flags whose name differs from the field.
ALIASES = {"tensor_parallel_size": ["-tp"], "pipeline_parallel_size": ["-pp"]}


def _field_comments(cls: type) -> dict[str, str]:
    """The one-line comment of each dataclass field, used as its --help text."""
    source = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", source, flags=re.MULTILINE))


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f"{cls.__name__}.{f.name}", "default": argparse.SUPPRESS,
                                  "help": comments.get(f.name, "")}
        ftype = str(f.type)
        if not ftype.startswith("bool"):
            kwargs["metavar"] = f.name.upper()
        if ftype in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif ftype.startswith("dict"):
            kwargs["type"], kwargs["metavar"] = json.loads, "JSON"
        elif ftype.startswith("int"):
            kwargs["type"] = int
        elif ftype.startswith("float"):
            kwargs["type"] = float
        group.add_argument(flag, *ALIASES.get(f.name, []), **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, not the whole usage: the flag at fault and why; exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m engine.serve",
        description="Serve a model with Gantry's engine behind an OpenAI-compatible API.")
    parser.add_argument("--config", metavar="ENGINE_YAML", default=None,
                        help="engine.yaml with `engine:` and `server:` sections; flags given override it")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_dataclass_flags(parser, EngineConfig, "engine (EngineConfig)")
    _add_dataclass_flags(parser, ServerConfig, "server (ServerConfig)")
    return parser


def parse_configs(argv: Sequence[str] | None = None) -> tuple[EngineConfig, ServerConfig, argparse.Namespace]:
    """Configs from --config (if any) with explicit flags on top; raises ConfigError."""
    args = build_parser().parse_args(argv)
    engine_config, server_config = load_config_file(args.config) if args.config else (EngineConfig(), ServerConfig())
    overrides: dict[str, dict[str, Any]] = {"EngineConfig": {}, "ServerConfig": {}}
    for dest, value in vars(args).items():
        if "." in dest:
            cls_name, name = dest.split(".", 1)
            overrides[cls_name][name] = value
    engine_config = dataclasses.replace(engine_config, **overrides["EngineConfig"])
    server_config = dataclasses.replace(server_config, **overrides["ServerConfig"])
    return engine_config, server_config, args


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    """Rank 0: the API (Sanic, single process) with the engine loading on its own thread."""
    from engine.server.app import create_app

    api_key = server_config.resolve_api_key()
    app = create_app(engine_config, server_config, api_key)
    app.run(host=server_config.host, port=server_config.port, single_process=True, access_log=False,
            motd=False)
    return app.ctx.state.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        engine_config, server_config, args = parse_configs(argv)
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if int(os.environ.get("RANK", "0")) > 0:
            # Ranks > 0 of a torchrun group run their shard of the model for rank 0's scheduler.
            from engine.distributed import run_worker

            run_worker(engine_config)
            return 0
        return serve(engine_config, server_config)
    except ConfigError as e:
        print(f"engine.serve: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

