"""What every target renders the same way: the torchrun command line, env and a summary."""
from __future__ import annotations

from launcher.plan import DEFAULT_KEY_ENV, Plan

Word = str  # a shell word: plain text (quoted when rendered) or a ShellExpr


TORCHRUN = "launcher.torchrun"  # torch.distributed.run, stopped rank 0 first and reported in one line


def torchrun_lines(plan: Plan, config: Word, node_rank: Word | None = None, master_addr: Word | None = None,
                   nnodes: Word | None = None) -> list[list[Word]]:
    """`-m launcher.torchrun ... -m engine.serve --config CONFIG`, one flag group per line.

    torchrun's own arguments; one node uses --standalone; several use the static rendezvous on
    node 0, so node rank 0 (which serves the API) is always the first machine.
    """
    lines: list[list[Word]] = [["-m", TORCHRUN],
                               ["--nnodes", nnodes or str(plan.nnodes), "--nproc-per-node", str(plan.nproc_per_node)]]
    if plan.multi_node:
        assert node_rank is not None and master_addr is not None, "multi-node torchrun needs a rank and a master"
        lines.append(["--node-rank", node_rank, "--master-addr", master_addr,
                      "--master-port", str(plan.cfg.parallel.master_port)])
    else:
        lines.append(["--standalone"])
    lines.append(["--max-restarts", "0"])
    lines.append(["-m", plan.cfg.deploy.module, "--config", config])
    return lines


def one_line(text: str) -> str:
    """Text safe inside a shell or YAML comment line."""
    return " ".join(text.split())


def flat(lines: list[list[Word]]) -> list[Word]:
    return [word for line in lines for word in line]


def extra_env(plan: Plan) -> list[tuple[str, str]]:
    """deploy.env as sorted (name, value) pairs."""
    return sorted((str(k), str(v)) for k, v in plan.cfg.deploy.env.items())


def summary(plan: Plan) -> str:
    """One line for the top of every artefact."""
    p = plan.cfg.parallel
    unit = "GPUs" if plan.use_gpus else "CPU processes"
    return one_line(f"{plan.cfg.model.name} on {p.nnodes} node(s) x {p.gpus_per_node} {unit}"
            f" (tp{p.tensor_parallel_size} x pp{p.pipeline_parallel_size}), deploy={plan.target}")


def key_env_check(plan: Plan) -> str | None:
    """The host variable a shell artefact must find set before starting (None: no check)."""
    if plan.api_key_source != "env":
        return None
    return plan.cfg.server.api_key_env


def key_env_to_unset(plan: Plan) -> str | None:
    """GANTRY_API_KEY when no key is configured: the engine would still read it from the environment
    (vLLM's rule for VLLM_API_KEY), and server=noauth means no key. Host-run scripts unset it."""
    return DEFAULT_KEY_ENV if plan.api_key_source == "none" else None


def engine_summary(plan: Plan) -> str:
    """The engine.yaml settings a reader of the seed's vLLM command looks for, on one line."""
    e = plan.engine
    key = {"none": "no API key", "literal": "API key in engine.yaml", "file": "API key from a file",
           "env": f"API key from ${plan.server['api_key_env'] or ''}"}[plan.api_key_source]
    if plan.target == "k8s" and plan.api_key_source != "none":
        key = f"API key from Secret {plan.cfg.server.api_key_secret}"
    return one_line(f"engine.yaml: model {e['model'] or 'embedded SmolLM2'}, served as {e['served_model_name'] or 'its own name'},"
            f" tensor_parallel_size {e['tensor_parallel_size']}, pipeline_parallel_size {e['pipeline_parallel_size']},"
            f" dtype {e['dtype']}, max_model_len {e['max_model_len']}, {key}")
