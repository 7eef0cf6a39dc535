"""The app factory's ops service: /metrics, /livez and /readyz on a socket of their own."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.observability import HealthApp, PrometheusMetrics
from gatewaykit.observability.ops import ops_app, ops_service
from gatewaykit.outbox.sqlite import SQLiteOutbox

pytestmark = pytest.mark.anyio


def listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


async def test_the_service_serves_its_recorder_and_the_ledger_health() -> None:
    sock = listening()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with SQLiteLedger(":memory:") as ledger:
        metrics, serve = ops_service(sock, ledger=ledger)
        async with serve(), httpx.AsyncClient(base_url=url) as http:
            with anyio.fail_after(5):
                while True:  # uvicorn starts in the background and says so by a flag only
                    try:
                        live = await http.get("/livez")
                        break
                    except httpx.ConnectError:
                        await anyio.sleep(0.01)
            assert live.json() == {"status": "ok"}
            assert (await http.get("/readyz")).json()["checks"] == {"ledger": "ok"}
            metrics.finished("/v1/chat/completions", 0.5)
            text = (await http.get("/metrics")).text
    sock.close()
    counts = {
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gatewaykit_request_seconds_count"
    }
    assert counts == {1.0}


async def test_the_platform_ops_app_reports_the_outbox(tmp_path: Path) -> None:
    async with SQLiteOutbox(str(tmp_path / "outbox.db")) as outbox:
        await outbox.enqueue("req_1:1", {"status": "success"})
        metrics = PrometheusMetrics()
        metrics.watch_outbox(outbox)
        app = ops_app(metrics, HealthApp(outbox=outbox))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ops") as http:
            ready = await http.get("/readyz")
            text = (await http.get("/metrics")).text
    assert ready.json() == {"status": "ok", "checks": {"outbox": "ok"}}
    pending = {
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "gatewaykit_outbox_pending"
    }
    assert pending == {1.0}


async def test_the_app_factory_serves_ops_on_the_socket_it_is_given() -> None:
    from gatewaykit import server
    from gatewaykit.config import parse_config

    config = parse_config(
        {
            "ledger": {"url": "sqlite://:memory:"},
            "upstreams": [{"base_url": "http://127.0.0.1:9/v1", "provider": "openai"}],
        },
        environ={},
        source="test",
    )
    sock = listening()
    app = server.build_app(config, ops_socket=sock)
    [middleware] = app.user_middleware
    assert isinstance(middleware.kwargs["metrics"], PrometheusMetrics)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    async with app.router.lifespan_context(app), httpx.AsyncClient(base_url=url) as http:
        with anyio.fail_after(5):
            while True:  # uvicorn starts in the background and says so by a flag only
                try:
                    ready = await http.get("/readyz")
                    break
                except httpx.ConnectError:
                    await anyio.sleep(0.01)
    sock.close()
    assert ready.json() == {"status": "ok", "checks": {"ledger": "ok"}}


async def test_the_service_of_a_platform_gateway_watches_its_outbox() -> None:
    sock = listening()
    async with SQLiteOutbox(":memory:") as outbox:
        await outbox.enqueue("req_1:1", {"status": "success"})
        metrics, _ = ops_service(sock, outbox=outbox)
        await metrics.refresh()
        text = generate_latest(metrics.registry).decode()
    sock.close()
    assert "gatewaykit_outbox_pending 1.0" in text
