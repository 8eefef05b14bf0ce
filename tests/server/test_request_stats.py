"""vLLM's per-request histograms, without a server: what one finished request observes (its n samples
together), vLLM's definitions of the phases, and a request aborted here left out of them."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.server.metrics import ServerMetrics, build_1_2_5_buckets
from engine.server.request_stats import TrackedRequest, finished_stats, observe_finished
from engine.server.request_stream import RequestStream

MAX_MODEL_LEN = 128


def _scrape(metrics: ServerMetrics) -> tuple[dict[tuple[str, tuple], float], dict[str, str]]:
    """/metrics as ({(sample name, labels): value}, {family name: help})."""
    values, helps = {}, {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        helps[family.name] = family.documentation
        for s in family.samples:
            assert s.labels.get("model_name") == "m", s
            values[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    return values, helps


def _bound() -> ServerMetrics:
    metrics = ServerMetrics()
    metrics.bind_engine("m", MAX_MODEL_LEN, lambda: None)
    return metrics


def _tracked(n: int = 2, max_tokens: int = 3) -> TrackedRequest:
    return TrackedRequest(RequestStream(["r"]), arrival_time=100.0, num_prompt_tokens=7, n=n, max_tokens=max_tokens)


def _out(t: TrackedRequest, metrics: RequestMetrics | None) -> RequestOutput:
    outputs = [CompletionOutput(i, "", [], None, None, "length") for i in range(t.n)]
    return RequestOutput("r", None, [0] * t.num_prompt_tokens, outputs, True, metrics)


def test_token_buckets_are_vllms_1_2_5_up_to_max_model_len() -> None:
    assert build_1_2_5_buckets(128) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(2000) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


def test_phases_and_counts_of_a_request_with_two_samples() -> None:
    metrics, t = _bound(), _tracked()
    t.observe_tokens(metrics, [CompletionOutput(0, "a", [1], None, None), CompletionOutput(1, "b", [2], None, None)],
                     101.0)
    t.observe_tokens(metrics, [CompletionOutput(0, "cd", [3, 4], None, None)], 102.0)  # sample 0 runs ahead
    t.observe_tokens(metrics, [CompletionOutput(1, "", [], None, None)], 102.5)  # nothing new: no observation
    got = finished_stats(t, _out(t, RequestMetrics(100.0, first_scheduled_time=100.25, first_token_time=101.0,
                                                   last_token_time=103.0)))
    assert (got.num_prompt_tokens, got.num_generation_tokens, got.max_num_generation_tokens, got.n,
            got.max_tokens) == (7, 4, 3, 2, 3)
    assert (got.queued_time, got.prefill_time, got.decode_time, got.inference_time) == (0.25, 0.75, 2.0, 2.75)
    assert t.last_token_time == 102.0  # the empty delta did not move it (nor observe an inter-token latency)


def test_observed_once_per_request_with_vllms_names_help_and_buckets() -> None:
    metrics, t = _bound(), _tracked()
    t.observe_tokens(metrics, [CompletionOutput(0, "", [1, 2, 3], None, None),
                               CompletionOutput(1, "", [4, 5, 6], None, None)], 101.0)
    out = _out(t, RequestMetrics(100.0, first_scheduled_time=100.5, first_token_time=101.0, last_token_time=101.0))
    observe_finished(metrics, "r", t, "length", out, log_requests=False)
    m, helps = _scrape(metrics)
    expected = {"request_prompt_tokens": 7, "request_generation_tokens": 6, "request_max_num_generation_tokens": 3,
                "request_params_n": 2, "request_params_max_tokens": 3, "request_queue_time_seconds": 0.5,
                "request_prefill_time_seconds": 0.5, "request_decode_time_seconds": 0.0,
                "request_inference_time_seconds": 0.5}
    for name, value in expected.items():
        assert m[(f"gantry:{name}_count", ())] == 1, name
        assert m[(f"gantry:{name}_sum", ())] == pytest.approx(value), name
    assert [le for (name, labels) in m if name == "gantry:request_params_n_bucket" for _, le in labels] == \
        ["1.0", "2.0", "5.0", "10.0", "20.0", "+Inf"]
    assert m[("gantry:request_params_n_bucket", (("le", "1.0"),))] == 0
    assert m[("gantry:request_params_n_bucket", (("le", "2.0"),))] == 1
    assert m[("gantry:request_prompt_tokens_bucket", (("le", "100.0"),))] == 1
    assert helps["gantry:request_prefill_time_seconds"] == "Histogram of time spent in PREFILL phase for request."
    assert helps["gantry:request_inference_time_seconds"] == "Histogram of time spent in RUNNING phase for request."
    assert helps["gantry:request_params_n"] == "Histogram of the n request parameter."


def test_a_request_aborted_here_counts_in_request_success_only() -> None:
    """As vLLM: a client that left (or a shutdown) ends a request no engine output finished; it is a
    request_success{abort} and an e2e latency here, and in none of the per-request histograms."""
    metrics, t = _bound(), _tracked()
    t.observe_tokens(metrics, [CompletionOutput(0, "", [1], None, None)], 101.0)
    observe_finished(metrics, "r", t, "abort", None, log_requests=False)
    m, _ = _scrape(metrics)
    assert m[("gantry:request_success_total", (("finished_reason", "abort"),))] == 1
    assert m[("gantry:e2e_request_latency_seconds_count", ())] == 1
    for name in ("request_prompt_tokens", "request_params_n", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_inference_time_seconds"):
        assert m[(f"gantry:{name}_count", ())] == 0, name


def test_finished_without_a_token_keeps_its_counts_and_no_phases() -> None:
    """The engine ended it before any token (a failure at its first step): no phase to measure."""
    t = _tracked(n=1)
    got = finished_stats(t, _out(t, RequestMetrics(100.0, first_scheduled_time=100.5)))
    assert (got.num_generation_tokens, got.max_num_generation_tokens, got.queued_time) == (0, 0, 0.5)
    assert got.prefill_time is got.decode_time is got.inference_time is None
