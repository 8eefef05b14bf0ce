"""The flags of `python -m engine.serve`: EngineConfig's and ServerConfig's fields, one flag each
(vLLM's spelling: --max-model-len), with each field's comment as its --help text. `--config
engine.yaml` (written by the launcher) is read first and explicit flags override it."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from collections.abc import Sequence
from typing import Any

from engine.config import DEFAULT_API_KEY_ENV, ConfigError, EngineConfig, ServerConfig, load_config_file
from engine.vllm_args import resolve_vllm_args

# vLLM's short spellings, and flags whose name differs from the field.
ALIASES = {"tensor_parallel_size": ["-tp"], "pipeline_parallel_size": ["-pp"]}


def _field_comments(cls: type) -> dict[str, str]:
    """The one-line comment of each dataclass field, used as its --help text."""
    source = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", source, flags=re.MULTILINE))


# What a field left unset means, for --help (never Python's `None`).
UNSET_MEANS = {
    "model": "the embedded SmolLM2-135M-Instruct",
    "tokenizer": "the model's",
    "served_model_name": "the model's file or directory name",
    "max_model_len": "the model's max_position_embeddings",
    "kv_cache_memory_gib": "GPU: what gpu_memory_utilization leaves; CPU: max(max_model_len, 8192) tokens",
    "num_kv_blocks": "sized from kv_cache_memory_gib or memory",
    "max_num_batched_tokens": "8192 on a GPU, 512 on CPU (a block at least)",
    "max_prefill_tokens_while_decoding": "4608 when serving (latency), max_num_batched_tokens offline (throughput)",
    "pipeline_parallel_lanes": "pipeline_parallel_size",
    "async_scheduling": "on for GPUs without pipeline parallel",
    "api_key_env": f"{DEFAULT_API_KEY_ENV} when set, else no key",
    "override_generation_config": "none",
}


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None or value == {}:
        return UNSET_MEANS.get(f.name, "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    group = parser.add_argument_group(title)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{comments.get(f.name, '')} (default: {_default_text(f)})".strip().replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": f"{cls.__name__}.{f.name}", "default": argparse.SUPPRESS, "help": help_text}
        ftype = str(f.type)
        if not ftype.startswith("bool"):
            kwargs["metavar"] = f.name.upper()
        if ftype in ("bool", "bool | None"):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "lora_modules":  # vLLM's form: --lora-modules name=path [name=path ...]
            kwargs.update(type=_lora_module, nargs="+", metavar="NAME=PATH")
        elif ftype.startswith("list"):  # vLLM's forms: --allowed-origins a b, or one JSON list '["a", "b"]'
            kwargs.update(type=str, nargs="*", action=_ListAction)
        elif ftype.startswith("dict"):
            kwargs["type"], kwargs["metavar"] = _json_object, "JSON"
        elif ftype.startswith("int"):
            kwargs["type"] = int
        elif ftype.startswith("float"):
            kwargs["type"] = float
        group.add_argument(flag, *ALIASES.get(f.name, []), **kwargs)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


class _ListAction(argparse.Action):
    """Strings given one by one, or one JSON list of strings (vLLM's older form)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if len(values) == 1 and values[0].lstrip().startswith("["):
            try:
                values = json.loads(values[0])
            except ValueError:
                raise argparse.ArgumentError(self, f"not a valid JSON list: {values[0]!r}") from None
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise argparse.ArgumentError(self, f"must be a JSON list of strings, got {values!r}")
        setattr(namespace, self.dest, list(values))


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        """One line, not the whole usage: the flag at fault and why; exit 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # vLLM's choices


def _add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """vLLM's flags that are not config fields (engine/vllm_args.py says what each does here)."""
    group = parser.add_argument_group("vLLM's flags (engine/vllm_args.py: taken where they mean what this engine "
                                      "does, else refused naming the flag)")

    def flag(name: str, default: str, help: str, **kwargs: Any) -> None:
        group.add_argument("--" + name.replace("_", "-"), dest=f"vllm.{name}", default=argparse.SUPPRESS,
                           help=f"{help} (default: {default})", **kwargs)

    flag("num_gpu_blocks_override", "--num-kv-blocks's", "vLLM's name of --num-kv-blocks", type=int, metavar="N")
    flag("disable_log_stats", "off", "taken: this engine logs no periodic stats (see /metrics)", action="store_true")
    flag("enable_chunked_prefill", "on", "on: what this engine always does (off is refused)",
         action=argparse.BooleanOptionalAction)
    flag("swap_space", "4", "ignored with a warning, as vLLM's v1 engine ignores it", type=float, metavar="GIB")
    flag("tokenizer_mode", "auto", "auto or hf: transformers' AutoTokenizer (others are refused)", metavar="MODE")
    flag("skip_tokenizer_init", "off", "refused: the engine needs the model's tokenizer", action="store_true")
    flag("max_seq_len_to_capture", "8192", "ignored with a warning, as vLLM's v1 engine ignores it", type=int,
         metavar="N")
    flag("revision", "none", "refused: local model paths only, nothing is downloaded", metavar="REVISION")
    flag("download_dir", "none", "refused: local model paths only, nothing is downloaded", metavar="DIR")
    flag("distributed_executor_backend", "mp", "mp: what this engine does (others are refused)", metavar="BACKEND")
    flag("uvicorn_log_level", "info", "taken: the HTTP server (not uvicorn) logs no connection lines; --log-level "
         "sets this engine's", choices=UVICORN_LOG_LEVELS)
    flag("disable_frontend_multiprocessing", "off", "ignored with a warning, as vLLM's v1 engine ignores it (the "
         "engine core is its own process)", action="store_true")
    group.add_argument("--disable-log-requests", dest="ServerConfig.log_requests", action="store_false",
                       default=argparse.SUPPRESS,
                       help="vLLM's: no line per finished request, same as --no-log-requests (default: logged)")
    group.add_argument("--enable-log-requests", dest="ServerConfig.log_requests", action="store_true",
                       default=argparse.SUPPRESS,
                       help="vLLM's: a line per finished request, same as --log-requests (default: logged)")


def _server_only_warnings(vllm: dict[str, Any]) -> list[str]:
    """Warning lines for the vLLM flags only a server has."""
    warnings = []
    if vllm.pop("uvicorn_log_level", "info") in ("debug", "trace"):
        warnings.append("--uvicorn-log-level: the HTTP server is not uvicorn and logs no connection lines; "
                        "--log-level debug sets this engine's own")
    if vllm.pop("disable_frontend_multiprocessing", False):
        warnings.append("--disable-frontend-multiprocessing: ignored, as vLLM's v1 engine ignores it (the engine "
                        "core runs in a process of its own)")
    return warnings


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m engine.serve",
        description="Serve a model with Gantry's engine behind an OpenAI-compatible API.")
    parser.add_argument("--config", metavar="ENGINE_YAML", default=None,
                        help="engine.yaml with `engine:` and `server:` sections; flags given override it "
                             "(default: none)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="(default: info)")
    _add_dataclass_flags(parser, EngineConfig, "engine (EngineConfig)")
    _add_dataclass_flags(parser, ServerConfig, "server (ServerConfig)")
    parser.add_argument("--disable-ui", dest="ServerConfig.ui", action="store_false", default=argparse.SUPPRESS,
                        help="do not serve the built-in chat page at / and /ui, same as --no-ui (default: served)")
    _add_vllm_flags(parser)
    return parser


def parse_configs(argv: Sequence[str] | None = None) -> tuple[EngineConfig, ServerConfig, argparse.Namespace]:
    """Configs from --config (if any) with explicit flags on top; raises ConfigError. args.vllm_warnings: lines
    for the caller to log, about vLLM flags taken but ignored."""
    args = build_parser().parse_args(argv)
    engine_config, server_config = load_config_file(args.config) if args.config else (EngineConfig(), ServerConfig())
    overrides: dict[str, dict[str, Any]] = {"EngineConfig": {}, "ServerConfig": {}, "vllm": {}}
    for dest, value in vars(args).items():
        if "." in dest:
            cls_name, name = dest.split(".", 1)
            if name == "lora_modules":  # [(name, path), ...] from the flag; a name given twice is ambiguous
                names = [n for n, _ in value]
                if len(set(names)) < len(names):
                    raise ConfigError("lora_modules", f"an adapter name is given twice: {', '.join(names)}")
                value = dict(value)
            overrides[cls_name][name] = value
    args.vllm_warnings = _server_only_warnings(overrides["vllm"])
    engine_overrides, warnings = resolve_vllm_args({**overrides["EngineConfig"], **overrides["vllm"]})
    args.vllm_warnings = warnings + args.vllm_warnings
    overrides["EngineConfig"] = engine_overrides
    engine_config = dataclasses.replace(engine_config, **overrides["EngineConfig"])
    server_config = dataclasses.replace(server_config, **overrides["ServerConfig"])
    return engine_config, server_config, args
