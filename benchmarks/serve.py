"""Online serving benchmark: load an OpenAI-compatible server and measure latency and throughput.

Like vLLM's `vllm bench serve`, written for Gantry. Requests with random token-id prompts
(or fixed lengths) are streamed to /v1/completions (default) or /v1/chat/completions with
`ignore_eos: true` and `max_tokens` = the output length, arriving as a Poisson process at
--request-rate (gamma-distributed gaps with --burstiness; `inf` sends all at once), capped
at --max-concurrency in flight. Token counts come from the server's usage
(`stream_options.include_usage`); chunks are counted only when a server sends no usage.

Reported per run: completed/failed requests, duration, request/input/output/total token
throughput, and mean/median/p90/p99 of TTFT (time to first token), TPOT (time per output
token after the first: (E2E - TTFT) / (output tokens - 1), per request), ITL (inter-token
latency: every gap between consecutive streamed chunks) and E2E latency. The client is one
asyncio loop on httpx, about 30 us of CPU per streamed chunk; at very high token rates give
it a core of its own, or it adds its own queueing to ITL.

This file holds the workload (random token-id requests, arrival times), the run loop and the
CLI; one request's HTTP side is benchmarks/serve_client.py, the metrics and reports
benchmarks/serve_report.py, the client processes benchmarks/serve_clients.py.

Exit status: 0 all requests succeeded, 3 some failed, 1 the server was not ready or
unusable, 2 bad arguments.

Examples:
    python -m benchmarks.serve --num-prompts 200 --random-input-len 512 --random-output-len 128 --request-rate 8
    python -m benchmarks.serve --request-rates 1,2,4,inf --num-prompts 100 --result-json sweep.json
    python -m benchmarks.serve --find-peak --num-prompts 500 --result-json peak.json   # inf, then 0.5 x peak
    python -m benchmarks.serve --endpoint /v1/chat/completions --max-concurrency 16 --api-key $KEY
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np

from benchmarks.serve_client import CHAT, COMPLETIONS, auth_headers, build_payload, make_client, send_request
from benchmarks.serve_report import (DEFAULT_PERCENTILES, RequestResult, compute_metrics, format_run, format_table,
                                     peak_concurrency, write_result_json)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


# ---- workload ----

@dataclass
class RequestSpec:
    """One request of the workload: its prompt (token ids, or text for chat) and lengths."""

    prompt: list[int] | str
    prompt_len: int  # tokens asked for; the server's usage gives the real count
    output_len: int  # max_tokens, with ignore_eos


def _lengths(rng: np.random.Generator, num: int, length: int, range_ratio: float) -> list[int]:
    """`num` lengths uniform on [length * (1 - r), length * (1 + r)] (vLLM's random dataset), at least 1."""
    low = max(1, int(length * (1.0 - range_ratio)))
    high = max(low, int(length * (1.0 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=num)]


def sample_random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                           vocab_size: int, seed: int) -> list[RequestSpec]:
    """Random token-id prompts; independent ids per request, so prefix caching finds nothing to share."""
    if num_prompts < 1 or input_len < 1 or output_len < 1:
        raise ValueError("num_prompts, input_len and output_len must be >= 1")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"random range ratio must be in [0, 1), got {range_ratio}")
    if vocab_size < 2:
        raise ValueError(f"vocab size must be >= 2, got {vocab_size}")
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = _lengths(rng, num_prompts, output_len, range_ratio)
    return [RequestSpec([int(t) for t in rng.integers(0, vocab_size, size=n_in)], n_in, n_out)
            for n_in, n_out in zip(in_lens, out_lens, strict=True)]


def arrival_offsets(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times in seconds after the start, one per request.

    Gaps are gamma-distributed with shape `burstiness` and mean 1 / request_rate: burstiness 1
    is a Poisson process, below 1 burstier, above 1 more regular. An infinite rate sends all at 0.
    """
    if num < 0:
        raise ValueError("num must be >= 0")
    if math.isinf(request_rate):
        return [0.0] * num
    if request_rate <= 0:
        raise ValueError(f"request rate must be > 0, got {request_rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num)
    # The first request goes at once; later ones after their gaps.
    return ([0.0] + [float(x) for x in np.cumsum(gaps[1:])]) if num else []


# ---- a run ----

@dataclass
class RunConfig:
    """Everything one benchmark run needs besides its workload."""

    base_url: str = DEFAULT_BASE_URL
    endpoint: str = COMPLETIONS
    model: str = ""
    api_key: str | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    temperature: float = 0.0
    extra_body: dict[str, Any] | None = None
    request_timeout_s: float = 3600.0
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    client_processes: int = 1  # > 1: requests spread over processes (benchmarks/serve_clients.py)


async def run_benchmark(specs: Sequence[RequestSpec], cfg: RunConfig,
                        client: httpx.AsyncClient | None = None) -> dict[str, Any]:
    """Send `specs` at cfg's arrival times (at most max_concurrency in flight); metrics plus per-request results."""
    if not cfg.model:
        raise ValueError("RunConfig.model is empty: pass --model or fetch it with first_model()")
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    chat = cfg.endpoint == CHAT
    headers = auth_headers(cfg.api_key)
    offsets = arrival_offsets(len(specs), cfg.request_rate, cfg.burstiness, cfg.seed)
    if cfg.client_processes > 1 and cfg.max_concurrency is None:
        from benchmarks.serve_clients import run_in_processes

        results, duration = await asyncio.to_thread(run_in_processes, list(specs), offsets, cfg, cfg.client_processes)
        return _run_record(cfg, results, duration, peak_concurrency(results))
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    own_client = client is None
    client = client or make_client(cfg.request_timeout_s)
    in_flight = 0
    peak_in_flight = 0

    async def one(spec: RequestSpec, offset: float, t0: float) -> RequestResult:
        nonlocal in_flight, peak_in_flight
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        payload = build_payload(cfg.endpoint, cfg.model, spec, cfg.temperature, cfg.extra_body)
        if sem is not None:
            await sem.acquire()
        send_time = time.perf_counter() - t0
        in_flight += 1
        peak_in_flight = max(peak_in_flight, in_flight)
        try:
            result = await send_request(client, url, payload, headers, chat)
        finally:
            in_flight -= 1
            if sem is not None:
                sem.release()
        result.send_time = send_time
        return result

    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(s, o, t0) for s, o in zip(specs, offsets, strict=True)))
        duration = time.perf_counter() - t0
    finally:
        if own_client:
            await client.aclose()
    return _run_record(cfg, results, duration, peak_in_flight)


def _run_record(cfg: RunConfig, results: Sequence[RequestResult], duration: float, peak: int) -> dict[str, Any]:
    """One run: its load settings, its metrics (with the peak requests in flight) and its per-request results."""
    metrics = compute_metrics(results, duration, cfg.percentiles)
    metrics["peak_concurrency"] = peak
    return {"request_rate": cfg.request_rate, "burstiness": cfg.burstiness,
            "max_concurrency": cfg.max_concurrency, "metrics": metrics, "requests": results}


# ---- server discovery ----

async def wait_ready(client: httpx.AsyncClient, base_url: str, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll GET /ready until 200; raises TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    for _ in range(max(1, int(timeout_s / poll_s) + 2)):
        try:
            r = await client.get(base_url.rstrip("/") + "/ready", timeout=min(10.0, max(timeout_s, 0.1)))
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(poll_s)
    raise TimeoutError(f"{base_url}/ready not 200 after {timeout_s:g}s (last: {last})")


async def first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    """The id of the first model GET /v1/models lists."""
    r = await client.get(base_url.rstrip("/") + "/v1/models", headers=auth_headers(api_key))
    r.raise_for_status()
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"])


async def detokenize_prompts(client: httpx.AsyncClient, base_url: str, api_key: str | None,
                             specs: list[RequestSpec]) -> list[RequestSpec]:
    """Chat needs text: turn token-id prompts into text with the server's /detokenize."""
    out = []
    for s in specs:
        if isinstance(s.prompt, str):
            out.append(s)
            continue
        r = await client.post(base_url.rstrip("/") + "/detokenize", json={"tokens": s.prompt},
                              headers=auth_headers(api_key))
        r.raise_for_status()
        out.append(RequestSpec(str(r.json()["prompt"]), s.prompt_len, s.output_len))
    return out


# ---- CLI ----

def parse_rate(text: str) -> float:
    rate = float(text)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf, got {text}")
    return rate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server root (default %(default)s)")
    p.add_argument("--endpoint", default=COMPLETIONS, choices=[COMPLETIONS, CHAT])
    p.add_argument("--api-key", default=os.environ.get("GANTRY_API_KEY"),
                   help="sent as `Authorization: Bearer`; default $GANTRY_API_KEY")
    p.add_argument("--model", default=None, help="default: the first model of /v1/models")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for GET /ready (0: skip)")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds one request may take")
    load = p.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=100)
    load.add_argument("--request-rate", type=parse_rate, default=math.inf,
                      help="mean arrivals per second; inf sends every request at once (default)")
    load.add_argument("--request-rates", default=None,
                      help="comma-separated rates run one after another, e.g. 1,2,4,inf (a sweep; prints a table)")
    load.add_argument("--find-peak", action="store_true",
                      help="run at rate inf to measure the peak request throughput, then at --peak-fraction of it")
    load.add_argument("--peak-fraction", type=float, default=0.5)
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the gaps: 1 Poisson, <1 burstier, >1 more regular")
    load.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    load.add_argument("--client-processes", type=int, default=1,
                      help="spread the requests over this many client processes (one loop falls behind past "
                           "~10k streamed chunks/s and then reports back-to-back chunks as ~0 ms gaps)")
    load.add_argument("--num-warmups", type=int, default=1, help="unmeasured requests sent first, one at a time")
    data = p.add_argument_group("workload")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="lengths uniform on [len*(1-r), len*(1+r)]; 0 = fixed lengths")
    data.add_argument("--vocab-size", type=int, default=32000,
                      help="prompt token ids are drawn from [0, vocab-size); must not exceed the model's vocabulary")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--temperature", type=float, default=0.0)
    data.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request body")
    out = p.add_argument_group("output")
    out.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles (default %(default)s)")
    out.add_argument("--result-json", default=None, help="write config, every run's metrics (and peak) here")
    out.add_argument("--save-requests", action="store_true", help="also put per-request timings in --result-json")
    return p


async def _main_async(args: argparse.Namespace) -> dict[str, Any]:
    percentiles = tuple(float(x) for x in args.percentiles.split(",") if x.strip())
    base_url = args.base_url.rstrip("/")
    async with make_client(args.request_timeout) as client:
        if args.ready_timeout > 0:
            print(f"waiting for {base_url}/ready (up to {args.ready_timeout:g}s)", flush=True)
            await wait_ready(client, base_url, args.ready_timeout)
        model = args.model or await first_model(client, base_url, args.api_key)
        specs = sample_random_requests(args.num_prompts + args.num_warmups, args.random_input_len,
                                       args.random_output_len, args.random_range_ratio, args.vocab_size, args.seed)
        if args.endpoint == CHAT:
            specs = await detokenize_prompts(client, base_url, args.api_key, specs)
        warmups, specs = specs[:args.num_warmups], specs[args.num_warmups:]
        cfg = RunConfig(base_url=base_url, endpoint=args.endpoint, model=model, api_key=args.api_key,
                        burstiness=args.burstiness, max_concurrency=args.max_concurrency, seed=args.seed,
                        temperature=args.temperature, extra_body=args.extra_body,
                        request_timeout_s=args.request_timeout, percentiles=percentiles,
                        client_processes=args.client_processes)
        if warmups:
            warm = await run_benchmark(warmups, replace(cfg, max_concurrency=1), client)
            if warm["metrics"]["failed"]:
                raise RuntimeError(f"warm-up request failed: {warm['metrics']['errors']}")
        print(f"model {model}: {len(specs)} requests, input ~{args.random_input_len}, output "
              f"~{args.random_output_len} tokens, endpoint {args.endpoint}", flush=True)

        runs: list[dict[str, Any]] = []
        peak: dict[str, Any] | None = None

        async def run_at(rate: float) -> dict[str, Any]:
            label = "inf" if math.isinf(rate) else f"{rate:g}"
            print(f"running at request rate {label} req/s ...", flush=True)
            run = await run_benchmark(specs, replace(cfg, request_rate=rate), client)
            print(format_run(run), flush=True)
            runs.append(run)
            return run

        if args.find_peak:
            first = await run_at(math.inf)
            peak_rate = first["metrics"]["request_throughput"]
            if peak_rate <= 0:
                raise RuntimeError("the peak run completed no request; cannot derive a rate")
            target = args.peak_fraction * peak_rate
            peak = {"peak_request_throughput": peak_rate, "peak_fraction": args.peak_fraction,
                    "target_request_rate": target}
            print(f"peak request throughput {peak_rate:.3f} req/s; now at {args.peak_fraction:g} x peak = "
                  f"{target:.3f} req/s", flush=True)
            await run_at(target)
        else:
            rates = ([parse_rate(x) for x in args.request_rates.split(",") if x.strip()]
                     if args.request_rates else [args.request_rate])
            for rate in rates:
                await run_at(rate)
        if len(runs) > 1:
            print(format_table(runs), flush=True)
    return {"config": {k: v for k, v in vars(args).items() if k != "api_key"} | {"model": model},
            "peak": peak, "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.peak_fraction <= 0 or args.num_prompts < 1 or args.num_warmups < 0:
        print("serve bench: --peak-fraction and --num-prompts must be > 0, --num-warmups >= 0", file=sys.stderr)
        return 2
    if args.max_concurrency is not None and args.max_concurrency < 1:
        print("serve bench: --max-concurrency must be >= 1", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(_main_async(args))
    except (TimeoutError, RuntimeError, ValueError, httpx.HTTPError) as e:
        print(f"serve bench: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.result_json:
        report["config"]["request_rate"] = str(args.request_rate)
        write_result_json(args.result_json, report, argv, args.save_requests)
        print(f"wrote {args.result_json}")
    failed = sum(r["metrics"]["failed"] for r in report["runs"])
    return 0 if failed == 0 else 3


if __name__ == "__main__":
    sys.exit(main())
