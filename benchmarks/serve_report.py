"""What an online serving run produced, turned into numbers and text: the per-request record
(RequestResult), the run's metrics (throughputs; mean/median/std/percentiles of TTFT, TPOT, ITL
and E2E in ms; peak concurrency), vLLM-style text reports and the --result-json file for
benchmarks/serve.py."""
from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)


# ---- one request's record ----

@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds (perf_counter based)."""

    success: bool = False
    error: str = ""
    prompt_tokens: int = 0  # from the server's usage
    output_tokens: int = 0  # from the server's usage
    usage_reported: bool = False
    ttft: float = 0.0  # send -> first generated chunk
    latency: float = 0.0  # send -> end of stream (E2E)
    itl: list[float] = field(default_factory=list)  # gaps between consecutive generated chunks
    send_time: float = 0.0  # seconds after the benchmark start
    output_len: int = 0  # tokens asked for


# ---- metrics ----

def _stats(values: Sequence[float], percentiles: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, median, std and p<k> of values (times scale: seconds -> ms); zeros when empty."""
    arr = np.asarray(values, dtype=np.float64) * scale
    out = {"mean": float(arr.mean()) if arr.size else 0.0,
           "median": float(np.median(arr)) if arr.size else 0.0,
           "std": float(arr.std()) if arr.size else 0.0}
    for p in percentiles:
        out[f"p{p:g}"] = float(np.percentile(arr, p)) if arr.size else 0.0
    return out


def compute_metrics(results: Sequence[RequestResult], duration: float,
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    """The run's figures: counts, throughputs over `duration`, latency statistics in milliseconds."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    dur = max(duration, 1e-9)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "input_throughput": total_in / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "usage_missing": sum(1 for r in ok if not r.usage_reported),
        "ttft_ms": _stats([r.ttft for r in ok], percentiles),
        "tpot_ms": _stats(tpots, percentiles),
        "itl_ms": _stats([g for r in ok for g in r.itl], percentiles),
        "e2el_ms": _stats([r.latency for r in ok], percentiles),
        "errors": sorted({r.error for r in results if not r.success})[:10],
    }


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most requests in flight at once, from the requests' intervals: +1 at each send, -1 at each end."""
    events = sorted([(r.send_time, 1) for r in results] + [(r.send_time + r.latency, -1) for r in results])
    return int(np.cumsum([d for _, d in events]).max()) if events else 0


# ---- reporting ----

def format_run(run: dict[str, Any]) -> str:
    """vLLM-style block of one run's figures."""
    m = run["metrics"]
    rate = run["request_rate"]
    lines = [f"{' Serving Benchmark Result ':=^60}"]

    def row(name: str, value: Any, fmt: str = "{:<14.2f}") -> None:
        lines.append(f"{name:<44}" + (fmt.format(value) if not isinstance(value, str) else value))

    row("Request rate (req/s):", "inf" if math.isinf(rate) else f"{rate:.2f}")
    row("Burstiness:", f"{run['burstiness']:g}")
    row("Max concurrency:", str(run["max_concurrency"] or "unlimited"))
    row("Successful requests:", m["completed"], "{:<14d}")
    row("Failed requests:", m["failed"], "{:<14d}")
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["total_input_tokens"], "{:<14d}")
    row("Total generated tokens:", m["total_output_tokens"], "{:<14d}")
    row("Request throughput (req/s):", m["request_throughput"])
    row("Input token throughput (tok/s):", m["input_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    row("Peak concurrent requests:", m["peak_concurrency"], "{:<14d}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        lines.append(f"{title:-^60}")
        name = key.split("_")[0].upper()
        for stat, value in m[key].items():
            if stat in ("std", "p50"):  # p50 is the median, printed as such
                continue
            label = stat.capitalize() if stat in ("mean", "median") else stat.upper()
            row(f"{label} {name} (ms):", value)
    if m["usage_missing"]:
        lines.append(f"note: {m['usage_missing']} responses carried no usage; their tokens were counted as chunks")
    for err in m["errors"]:
        lines.append(f"error: {err}")
    lines.append("=" * 60)
    return "\n".join(lines)


def format_table(runs: Sequence[dict[str, Any]]) -> str:
    """One line per run: rate, throughputs and p50/p99 latencies (ms)."""
    head = ("rate", "conc", "ok", "fail", "req/s", "out tok/s", "TTFT p50", "TTFT p99",
            "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "E2E p50")
    lines = [" ".join(f"{h:>10}" for h in head)]
    for run in runs:
        m = run["metrics"]
        rate = "inf" if math.isinf(run["request_rate"]) else f"{run['request_rate']:.3g}"
        cells = [rate, str(run["max_concurrency"] or "-"), str(m["completed"]), str(m["failed"]),
                 f"{m['request_throughput']:.2f}", f"{m['output_throughput']:.1f}",
                 *(f"{m[k].get(p, 0.0):.1f}" for k in ("ttft_ms", "tpot_ms", "itl_ms") for p in ("p50", "p99")),
                 f"{m['e2el_ms'].get('p50', 0.0):.1f}"]
        lines.append(" ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def run_to_json(run: dict[str, Any], with_requests: bool) -> dict[str, Any]:
    out = {k: v for k, v in run.items() if k != "requests"}
    out["request_rate"] = "inf" if math.isinf(run["request_rate"]) else run["request_rate"]
    if with_requests:
        out["requests"] = [asdict(r) for r in run["requests"]]
    return out


def _redact(argv: list[str]) -> list[str]:
    """The command line with the API key's value hidden, fit for a results file."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--api-key="):
            out[i] = "--api-key=***"
        elif a == "--api-key" and i + 1 < len(out):
            out[i + 1] = "***"
    return out


def write_result_json(path: str, report: dict[str, Any], argv: Sequence[str], with_requests: bool) -> None:
    """The --result-json file: the report, its runs as JSON and the command line (API key hidden)."""
    report["command"] = "python -m benchmarks.serve " + shlex.join(_redact(list(argv)))
    with open(path, "w") as f:
        json.dump({**report, "runs": [run_to_json(r, with_requests) for r in report["runs"]]}, f, indent=2)
