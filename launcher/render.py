"""Jinja rendering of a Plan into a job directory: StrictUndefined, quoting through filters.

Filters: `sh` (shlex.quote; ShellExpr passes through unquoted), `shjoin` (a quoted argv),
`tojson` (JSON, which is also a YAML flow scalar) and `yaml_str` (a double-quoted YAML string).
"""
from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import jinja2

from launcher.plan import Plan

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"  # ships beside launcher/ in the wheel


class ShellExpr(str):
    """A shell word to leave unquoted because the shell must expand it, e.g. "$SLURM_NODEID"."""


@dataclass(frozen=True)
class Artefact:
    template: str  # template path under templates/
    path: str  # output path relative to the job directory
    context: dict[str, Any]  # what the template sees
    executable: bool = False  # chmod +x (scripts)
    private: bool = False  # holds the API key: readable by its owner only


def shell_quote(value: Any) -> str:
    """One shell word: ShellExpr as is, a plain word as is, else quoted.

    A word holding a single quote, '$' or '`' is double-quoted with \\, ", $ and ` escaped: it reads
    better than shlex's '"'"' splicing, and shellcheck reads a '$' in single quotes as a forgotten
    expansion (SC2016). Others are single-quoted (shlex.quote).
    """
    if isinstance(value, ShellExpr):
        return str(value)
    text = str(value)
    if any(c in text for c in "'$`"):
        return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'
    return shlex.quote(text)


def shell_join(argv: Iterable[Any]) -> str:
    return " ".join(shell_quote(a) for a in argv)


def yaml_str(value: Any) -> str:
    """A double-quoted YAML scalar (JSON strings are valid YAML)."""
    return json.dumps(str(value), ensure_ascii=False)


def to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=False)


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(sh=shell_quote, shjoin=shell_join, tojson=to_json, yaml_str=yaml_str)
    return env


def render_job(plan: Plan, env: jinja2.Environment | None = None) -> dict[str, tuple[str, int]]:
    """Every file of the job, output path -> (text, mode): the target's artefacts and engine.yaml."""
    from launcher.targets import target_module  # targets import this module's ShellExpr

    env = env or environment()
    files = {a.path: (env.get_template(a.template).render(**a.context),
                      0o600 if a.private else 0o755 if a.executable else 0o644)
             for a in target_module(plan.target).artefacts(plan)}
    # a literal key (the user's choice) is the only secret engine.yaml can hold
    files["engine.yaml"] = (plan.engine_yaml(), 0o600 if plan.server.get("api_key") else 0o644)
    return files


def write_job(plan: Plan, files: dict[str, tuple[str, int]]) -> list[Path]:
    """Write the files under plan.job_dir and return their paths."""
    written = []
    for rel, (text, mode) in files.items():
        path = plan.job_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        path.chmod(mode)
        written.append(path)
    return written
