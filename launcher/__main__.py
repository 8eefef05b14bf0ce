"""`python -m launcher [group=option ...] [key=value ...]`: compose -> validate -> plan -> render -> run/submit.

Invalid configurations exit with status 2 and name the keys; nothing is rendered then (values of the
wrong type and unknown options are Hydra's messages, with status 2 too). What the
rendering machine lacks is a warning; submit=true refuses it (status 2). Ctrl-C is never a traceback.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from launcher import host, schema
from launcher.keys import unknown_override_keys, unparsable_overrides
from launcher.plan import Plan, PlanError, build_plan
from launcher.render import render_job, write_job
from launcher.targets import target_module

log = logging.getLogger("launcher")
EXIT_INVALID = 2  # the config cannot be deployed
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it

schema.register()


def _record(cfg: DictConfig, overrides: list[str]) -> str:
    """gantry.yaml: the composed config, resolved, with a literal API key masked."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    if resolved["server"].get("api_key"):
        resolved["server"]["api_key"] = "<hidden>"
    shown = [re.sub(r"^(\+*server\.api_key)=.*", r"\1=<hidden>", o) for o in overrides]
    header = "# python -m launcher " + " ".join(shown) + "\n"
    return header + OmegaConf.to_yaml(OmegaConf.create(resolved))


def _remove_empty(job_dir: Path, root: Path) -> None:
    """Remove the run directory Hydra made (and its empty parents below root, or below where a job_name
    with '..' led it) when nothing was rendered."""
    path = job_dir.resolve()
    root = Path(os.path.commonpath([path, root.resolve()]))
    while path != root and root in path.parents:
        try:
            path.rmdir()
        except OSError:
            return  # not empty, or not ours to remove
        path = path.parent


def _report(plan: Plan, paths: list[Path]) -> None:
    p = plan.cfg.parallel
    print(f"gantry: {plan.cfg.model.name}, tp{p.tensor_parallel_size} x pp{p.pipeline_parallel_size} on"
          f" {p.nnodes} node(s) x {p.gpus_per_node}, deploy={plan.target}")
    for path in paths:
        print(f"  {path.relative_to(plan.job_dir)}")
    print(f"job dir: {plan.job_dir}")


def launch(cfg: DictConfig, job_dir: Path, overrides: list[str]) -> int:
    """Render cfg into job_dir and run or submit it when asked; the exit status."""
    try:
        plan = build_plan(cfg, job_dir)
    except PlanError as e:
        for problem in e.problems:
            print(f"gantry: invalid config: {problem}", file=sys.stderr)
        _remove_empty(job_dir, Path(cfg.output_dir))
        return EXIT_INVALID
    files = render_job(plan)
    files["gantry.yaml"] = (_record(cfg, overrides), 0o644)
    _report(plan, write_job(plan, files))
    sys.stdout.flush()
    for note in host.render_notes(plan):
        print(f"gantry: {note}", file=sys.stderr)
    submit = cfg.submit if cfg.submit is not None else plan.target == "local"
    if not submit:
        return 0
    problems = host.submit_problems(plan)
    for problem in problems:
        print(f"gantry: cannot submit: {problem}", file=sys.stderr)
    if problems:
        return EXIT_INVALID
    return target_module(plan.target).submit(plan)


_composed = False  # set once Hydra composed the config: an exit before that is a config error


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    global _composed
    _composed = True
    hc = HydraConfig.get()
    swept = Path(hc.sweep.dir) / "multirun.yaml"  # a sweep's record of the config, as engine.yaml keeps a literal key
    if hc.mode == RunMode.MULTIRUN and cfg.server.api_key and swept.is_file():
        swept.chmod(0o600)
    code = launch(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    if code:
        sys.exit(code)


def _swept_key(args: list[str]) -> list[tuple[str, str]]:
    """A literal server.api_key in a sweep's overrides: Hydra prints every job's overrides."""
    sweep = any(a in ("-m", "--multirun") for a in args) or "hydra.mode=MULTIRUN" in args
    if sweep and any(re.match(r"\+*server\.api_key=(?!null$)", a) for a in args):
        return [("server.api_key", "a sweep (--multirun) prints every job's overrides: give the key through"
                                   " server.api_key_env or server.api_key_file instead")]
    return []


def main() -> None:
    """The console entry: typos in override keys first (one line each), then Hydra."""
    args = sys.argv[1:]
    unknown = unparsable_overrides(args) or unknown_override_keys(args) or _swept_key(args)
    for key, message in unknown:
        print(f"gantry: invalid config: {key}: {message}", file=sys.stderr)
    if unknown:
        sys.exit(EXIT_INVALID)
    try:
        _hydra_main()
    except KeyboardInterrupt:  # before or after the torchrun group ran (it handles its own Ctrl-C)
        print(file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as e:  # Hydra reports a value of the wrong type, or a missing option, with status 1
        if e.code == 1 and not _composed:
            sys.exit(EXIT_INVALID)
        raise


if __name__ == "__main__":
    main()
