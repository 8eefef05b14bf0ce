"""Prometheus metrics under the `gantry:` prefix, shaped like vLLM's `vllm:` ones.

Engine-wide gauges and counters are read from the latest EngineStats at scrape time;
per-request histograms are fed by the engine thread as requests advance and finish (request_stats.py);
HTTP requests are counted by route and status (a client that hangs up first, as aborted).
One CollectorRegistry per server; with several API processes, summed across them at scrape time, the
engine's from the freshest process's copy (freshest_stats).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import glob
import os
import time
from bisect import bisect_left

import msgspec

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so dashboards port by a prefix change.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
REQUEST_PARAMS_N_BUCKETS = [1, 2, 5, 10, 20]

PREFIX = "gantry:"
STATS_FILE_PREFIX = "engine_stats_"  # one API process's copy of the core's stats, in PROMETHEUS_MULTIPROC_DIR
FINISH_REASONS = ("stop", "length", "abort")  # request_success_total's finished_reason values


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value: vLLM's buckets for token counts (up to max_model_len)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


@dataclass
class FinishedRequestStats:
    """What a request the engine finished adds to vLLM's per-request histograms; one per request,
    its n samples together (vLLM's n child requests each add their own, and n and the longest once)."""

    num_prompt_tokens: int  # cached prefix included
    num_generation_tokens: int  # all samples together
    max_num_generation_tokens: int  # the longest sample's
    n: int  # the request's n (samples)
    max_tokens: int  # max_tokens as the engine ran it (resolved when the client gave none)
    queued_time: float | None  # arrival -> first scheduled; None: never scheduled
    prefill_time: float | None  # first scheduled -> first token; None: never scheduled or no token
    decode_time: float | None  # first token -> last token
    inference_time: float | None  # first scheduled -> last token


class _EngineStatsCollector(Collector):
    """Gauges and counters copied from the engine's latest EngineStats at scrape time."""

    GAUGES = (
        ("num_requests_running", "num_running", "Number of requests in model execution batches."),
        ("num_requests_waiting", "num_waiting", "Number of requests waiting to be processed."),
        ("kv_cache_usage_perc", "kv_cache_usage", "KV-cache usage. 1 means 100 percent usage."),
    )
    COUNTERS = (
        ("prompt_tokens", "prompt_tokens_total", "Number of prefill tokens processed."),  # cache hits included
        ("generation_tokens", "generation_tokens_total", "Number of generation tokens processed."),
        ("num_preemptions", "num_preemptions_total", "Cumulative number of preemptions from the engine."),
        ("prefix_cache_queries", "prefix_cache_queries_total",
         "Prefix cache queries, in terms of number of queried tokens."),
        ("prefix_cache_hits", "prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens."),
    )

    def __init__(self, model_name: str, get_stats: Callable[[], Any]):
        self.model_name = model_name
        self.get_stats = get_stats

    def collect(self) -> Iterable[Metric]:
        stats = self.get_stats()
        if stats is None:
            return
        shared_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared_dir is not None:
            stats = freshest_stats(stats, shared_dir, [attr for _, attr, _ in self.COUNTERS])
        for name, attr, doc in self.GAUGES:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(getattr(stats, attr)))
            yield g
        for name, attr, doc in self.COUNTERS:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric([self.model_name], float(getattr(stats, attr)))
            yield c
        if getattr(stats, "max_lora", 0):  # vLLM's shape: adapter names in labels, the time as the value
            g = GaugeMetricFamily(PREFIX + "lora_requests_info", "Running stats on lora requests.",
                                  labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"])
            g.add_metric([",".join(sorted(stats.running_lora_adapters)), str(stats.max_lora),
                          ",".join(sorted(stats.waiting_lora_adapters))], time.time())
            yield g


def freshest_stats(stats: Any, shared_dir: str, counters: list[str]) -> Any:
    """--api-server-count N: each API process holds its own copy of the core's stats, refreshed when a
    message reaches it (at least every heartbeat), so two scrapes answered by two processes could see a
    counter go back, which Prometheus reads as a reset (a rate() spike). Each scrape leaves this process's
    copy in the shared directory and answers with the freshest copy (most steps; this one on a tie), each
    counter the largest any copy holds: what one process exported, every later scrape exports at least."""
    path = os.path.join(shared_dir, f"{STATS_FILE_PREFIX}{os.getpid()}.msgpack")
    with open(path + ".tmp", "wb") as f:
        f.write(msgspec.msgpack.encode(stats))
    os.replace(path + ".tmp", path)  # a reader sees the old copy or the new one, never half of one
    decoder = msgspec.msgpack.Decoder(type(stats))
    copies = []
    for other in glob.glob(os.path.join(shared_dir, STATS_FILE_PREFIX + "*.msgpack")):
        if other == path:
            continue
        try:
            with open(other, "rb") as f:
                copies.append(decoder.decode(f.read()))
        except (OSError, msgspec.DecodeError):  # a process that exited meanwhile
            continue
    if not copies:
        return stats
    freshest = max(copies, key=lambda c: c.num_steps)
    if freshest.num_steps <= stats.num_steps:
        freshest = stats
    return msgspec.structs.replace(freshest, **{name: max(getattr(c, name) for c in [stats, *copies])
                                                for name in counters})


class BatchedHistogram:
    """A histogram child's observe() without its locks: counts per bucket kept here and added to the
    prometheus_client child (its _sum and _buckets values) by flush(). The inter-token latency is
    observed for every token of every stream, the API process's hottest metric; the server flushes
    after each engine step and before each scrape."""

    def __init__(self, child: Any):
        self.child = child
        self.bounds = list(child._upper_bounds)  # ends with +Inf
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket with value <= bound
        self.sum += value

    def flush(self) -> None:
        if not any(self.counts):
            return
        for i, count in enumerate(self.counts):
            if count:
                self.child._buckets[i].inc(count)
                self.counts[i] = 0
        self.child._sum.inc(self.sum)
        self.sum = 0.0


class ServerMetrics:
    """All of one server's metrics; engine metrics exist once the model (and its name) is loaded."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests by method, route and status.",
                                     ["method", "route", "status"], registry=self.registry)
        self.http_aborted = Counter(PREFIX + "http_requests_aborted",
                                    "HTTP requests whose client hung up before the response was complete.",
                                    ["method", "route"], registry=self.registry)
        self.model_name: str | None = None
        self._engine_collector: _EngineStatsCollector | None = None

    def bind_engine(self, model_name: str, max_model_len: int, get_stats: Callable[[], Any]) -> None:
        """Create the engine's metrics, labelled with the served model name."""
        self.model_name = model_name
        labels = ["model_name"]
        reg = self.registry
        self._engine_collector = _EngineStatsCollector(model_name, get_stats)
        reg.register(self._engine_collector)
        self.request_success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                                       labels + ["finished_reason"], registry=reg)
        for reason in FINISH_REASONS:  # as vLLM: every series exists from the start, so rate() sees the first one
            self.request_success.labels(model_name, reason)

        def histogram(name: str, doc: str, buckets: list[float] | list[int]) -> Any:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=reg).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = BatchedHistogram(histogram("inter_token_latency_seconds",
                                              "Histogram of inter-token latency in seconds.", ITL_BUCKETS))
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        REQUEST_LATENCY_BUCKETS)
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_tokens = histogram("request_prompt_tokens", "Number of prefill tokens processed.", token_buckets)
        self.generation_tokens = histogram("request_generation_tokens", "Number of generation tokens processed.",
                                           token_buckets)
        self.max_num_generation_tokens = histogram(
            "request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
            token_buckets)
        self.params_n = histogram("request_params_n", "Histogram of the n request parameter.", REQUEST_PARAMS_N_BUCKETS)
        self.params_max_tokens = histogram("request_params_max_tokens",
                                           "Histogram of the max_tokens request parameter.", token_buckets)

    def observe_first_token(self, ttft: float) -> None:
        """When the first token arrives, as vLLM: not when the request ends (minutes later for a long one)."""
        self.ttft.observe(ttft)

    def observe_finished(self, finish_reason: str, e2e: float, finished: FinishedRequestStats | None) -> None:
        """finished: None for a request aborted in this process (its client left, shutdown), which vLLM's
        per-request histograms leave out (they count what the engine finished)."""
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.e2e.observe(e2e)
        if finished is None:
            return
        for histogram, value in ((self.queue_time, finished.queued_time), (self.prefill_time, finished.prefill_time),
                                 (self.decode_time, finished.decode_time),
                                 (self.inference_time, finished.inference_time),
                                 (self.prompt_tokens, finished.num_prompt_tokens),
                                 (self.generation_tokens, finished.num_generation_tokens),
                                 (self.max_num_generation_tokens, finished.max_num_generation_tokens),
                                 (self.params_n, finished.n), (self.params_max_tokens, finished.max_tokens)):
            if value is not None:
                histogram.observe(value)

    def observe_http(self, method: str, route: str, status: int) -> None:
        self.http_requests.labels(method, route, str(status)).inc()

    def observe_aborted(self, method: str, route: str) -> None:
        self.http_aborted.labels(method, route).inc()

    def render(self) -> bytes:
        if self.model_name is not None:
            self.itl.flush()
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        # several API processes: every process's counters and histograms summed from their files,
        # the engine's gauges and counters once (from this process's copy of the core's stats)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        if self._engine_collector is not None:
            registry.register(self._engine_collector)
        return generate_latest(registry)
