"""The real stack (GatewayMiddleware + StandaloneMode + adapters + SQLiteLedger) in front
of the fake provider, with metrics and tracing configured per test; and a scrape helper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.observability import MetricsApp
from gatewaykit.observability.prometheus import MetricsBase
from gatewaykit.testing import FakeProvider
from gatewaykit.upstream import Upstream
from tests.scenarios import conftest as scenarios
from tests.scenarios.conftest import MASTER, PRICE, upstreams

# The scenarios' fixtures: the fake provider on a socket, the upstream client, the ledger
# (checked for invariants and leaked holds after every test).
provider_server = scenarios.provider_server
provider = scenarios.provider
client = scenarios.client
ledger = scenarios.ledger

Build = Callable[..., Starlette]


@pytest.fixture
def build(ledger: SQLiteLedger, client: AiohttpClient, provider: tuple[FakeProvider, str]) -> Build:
    """``build(metrics=..., tracing=..., base=URL | configured=[Upstream])``: the app."""
    _, url = provider

    def make(
        *, base: str | None = None, configured: list[Upstream] | None = None, **middleware: Any
    ) -> Starlette:
        serving = configured if configured is not None else upstreams(base or url)
        mode = StandaloneMode(
            ledger, prices={"test-model": PRICE}, upstreams=serving, master_key=MASTER
        )
        return Starlette(
            routes=gateway_routes(client=client),
            middleware=[Middleware(GatewayMiddleware, mode=mode, **middleware)],
        )

    return make


async def scrape(
    metrics: MetricsBase, **options: Any
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample ``MetricsApp`` serves, keyed by name and labels."""
    transport = httpx.ASGITransport(app=MetricsApp(metrics, **options))
    async with httpx.AsyncClient(transport=transport, base_url="http://ops") as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sample(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value (0 when the series does not exist)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
