"""prometheus_client's multiprocess mode: workers record, one MetricsApp serves the sum."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORKER = """
from decimal import Decimal
from gatewaykit.observability import MultiprocessPrometheusMetrics
from gatewaykit.settlement import SettlementOutcome
from gatewaykit.usage import Usage
metrics = MultiprocessPrometheusMetrics()
for _ in range(3):
    metrics.admitted("/v1/chat/completions", "m", Decimal("0.5"), 0.001)
    outcome = SettlementOutcome("success", Decimal("0.25"), Usage(10, 5), refunded=False)
    metrics.settled("/v1/chat/completions", "m", Decimal("0.5"), outcome, 0.001)
metrics.admitted("/v1/chat/completions", "m", Decimal("0.5"), 0.001)  # still held
"""

SCRAPE = """
import asyncio, os, sys
import httpx
from gatewaykit.observability import MetricsApp, MultiprocessPrometheusMetrics
async def main():
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    app = MetricsApp(MultiprocessPrometheusMetrics(), multiprocess_dir=directory)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ops") as http:
        sys.stdout.write((await http.get("/metrics")).text)
asyncio.run(main())
"""


def run(code: str, directory: Path) -> str:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


@pytest.mark.slow
def test_two_workers_are_served_as_one(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    run(WORKER, tmp_path)
    run(WORKER, tmp_path)
    text = run(SCRAPE, tmp_path)
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("gatewaykit_cost_usd_total", frozenset({("model", "m")}))] == 1.5
    success = {("route", "/v1/chat/completions"), ("model", "m"), ("outcome", "success")}
    assert samples[("gatewaykit_requests_total", frozenset(success))] == 6
    tokens = {("model", "m"), ("kind", "input")}
    assert samples[("gatewaykit_tokens_total", frozenset(tokens))] == 60
    assert samples[("gatewaykit_ledger_seconds_count", frozenset({("op", "settle")}))] == 6
    # The holds gauges are summed over the workers' files ("livesum"); a worker's file is
    # dropped when the server marks it dead (docs/observability.md), not before.
    assert samples[("gatewaykit_holds_live", frozenset())] == 2
    assert samples[("gatewaykit_held_usd", frozenset())] == 1.0
