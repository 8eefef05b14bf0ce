"""A real Prometheus server (Debian's `prometheus` package) scrapes /metrics every second;
its HTTP API must show generated tokens and one TTFT observation per request sent."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import MODEL, LiveServer, free_port, launch, wait_ready

pytestmark = pytest.mark.infra

PROMETHEUS = shutil.which("prometheus")
NUM_REQUESTS = 5


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    if PROMETHEUS is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (Debian package `prometheus`); CI must install it")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    return PROMETHEUS


@pytest.fixture(scope="module")
def metrics_server(tmp_path_factory: pytest.TempPathFactory):
    s = wait_ready(launch(tmp_path_factory.mktemp("metrics-server")))
    yield s
    s.stop()


def query(prom_url: str, expr: str) -> float | None:
    r = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    result = r.json()["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_metrics(prometheus_binary: str, metrics_server: LiveServer, tmp_path: Path):
    # The requests first: streaming and not, chat and completions.
    for i in range(NUM_REQUESTS):
        stream = i % 2 == 1
        if i < 3:
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 3,
                    "ignore_eos": True, "stream": stream}
            r = httpx.post(metrics_server.url("/v1/chat/completions"), json=body, timeout=120)
        else:
            body = {"model": MODEL, "prompt": f"Number {i}", "max_tokens": 3, "ignore_eos": True,
                    "stream": stream}
            r = httpx.post(metrics_server.url("/v1/completions"), json=body, timeout=120)
        assert r.status_code == 200, r.text

    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: gantry\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{metrics_server.port}']\n"
    )
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    prom = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        tokens = ttft_count = None
        while time.monotonic() < deadline:
            try:
                tokens = query(prom, "gantry:generation_tokens_total")
                ttft_count = query(prom, "gantry:time_to_first_token_seconds_count")
                up = query(prom, 'up{job="gantry"}')
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            except httpx.HTTPStatusError as e:  # 503 while Prometheus still starts (its TSDB not open yet)
                if e.response.status_code != 503:
                    raise
                time.sleep(0.5)
                continue
            if up == 1 and tokens and ttft_count == NUM_REQUESTS:
                break
            time.sleep(0.5)
        assert tokens is not None and tokens > 0, (tokens, (tmp_path / "prometheus.log").read_text()[-2000:])
        assert ttft_count == NUM_REQUESTS
        assert query(prom, 'gantry:request_success_total{finished_reason="length"}') == NUM_REQUESTS
        assert query(prom, "gantry:kv_cache_usage_perc") == 0
        buckets = query(prom, 'count(gantry:time_to_first_token_seconds_bucket)')
        assert buckets == 23  # vLLM's 22 boundaries and +Inf
    finally:
        proc.terminate()
        proc.wait(30)
