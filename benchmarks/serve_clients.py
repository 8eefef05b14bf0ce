"""Several client processes for benchmarks/serve.py. One asyncio loop spends ~30-60 us of CPU per
streamed chunk; at a few hundred streams of an H200 (~18k chunks/s) it falls behind, reads two
chunks of a stream from its socket at once and reports a gap of ~0 ms between them (ITL p50 0.02 ms
at W1's peak). Split over N processes, each stream is read as its chunks arrive."""
from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING

import httpx

from benchmarks.serve_client import CHAT, auth_headers, build_payload, make_client, send_request

if TYPE_CHECKING:
    from benchmarks.serve import RequestSpec, RunConfig
    from benchmarks.serve_report import RequestResult

START_DELAY_S = 3.0  # time for the processes to start and import before the common start instant


def run_in_processes(specs: list[RequestSpec], offsets: list[float], cfg: RunConfig,
                     num_processes: int) -> tuple[list[RequestResult], float]:
    """Every request sent at its offset after one common instant, request i by process i % N;
    returns the results in the order of specs and the run's duration (start to the last end)."""
    parts = [list(range(p, len(specs), num_processes)) for p in range(num_processes)]
    start_wall = time.time() + START_DELAY_S
    with ProcessPoolExecutor(num_processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_part, [specs[i] for i in part], [offsets[i] for i in part], cfg, start_wall)
                   for part in parts]
        outs = [f.result() for f in futures]
    results: list[RequestResult | None] = [None] * len(specs)
    for part, (part_results, _) in zip(parts, outs, strict=True):
        for i, result in zip(part, part_results, strict=True):
            results[i] = result
    return results, max(end for _, end in outs) - start_wall  # type: ignore[return-value]


def _run_part(specs: list[RequestSpec], offsets: list[float], cfg: RunConfig,
              start_wall: float) -> tuple[list[RequestResult], float]:
    return asyncio.run(_part(specs, offsets, cfg, start_wall))


async def _part(specs: list[RequestSpec], offsets: list[float], cfg: RunConfig,
                start_wall: float) -> tuple[list[RequestResult], float]:
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    headers = auth_headers(cfg.api_key)
    async with make_client(cfg.request_timeout_s) as client:
        try:  # the first request of a fresh process pays ~0.4 s of lazy set-up: not a request's TTFT
            await client.get(cfg.base_url.rstrip("/") + "/v1/models", headers=headers)
        except httpx.HTTPError:
            pass
        await asyncio.sleep(max(0.0, start_wall - time.time()))
        t0 = time.perf_counter()
        late = time.time() - start_wall  # this process's lag behind the common instant

        async def one(spec: RequestSpec, offset: float) -> RequestResult:
            delay = t0 + offset - late - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            payload = build_payload(cfg.endpoint, cfg.model, spec, cfg.temperature, cfg.extra_body)
            send_time = time.time() - start_wall
            result = await send_request(client, url, payload, headers, cfg.endpoint == CHAT)
            result.send_time = send_time
            return result

        results = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets, strict=True)))
    return list(results), time.time()
