"""DenialCounter: refusals counted in process, flushed to the ledger in aggregate."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gatewaykit import GatewayMiddleware, get_settlement
from gatewaykit.denials import DenialCounter
from gatewaykit.errors import ConfigurationError, ErrorKind
from gatewaykit.ledger.base import DenialCount, DenialStore, Period
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.usage import Usage
from tests.middleware.conftest import MakeKey, bearer, chat
from tests.middleware.fake_ledger import FakeLedger

pytestmark = pytest.mark.anyio


def this_hour() -> datetime:
    return datetime.fromtimestamp(int(time.time()) // 3600 * 3600, timezone.utc)


async def test_refusals_are_counted_per_reason_and_flushed_in_one_write() -> None:
    ledger = FakeLedger()
    counter = DenialCounter(ledger)
    for _ in range(1000):
        counter.refused(ErrorKind.AUTHENTICATION)
    counter.refused(ErrorKind.BUDGET)
    counter.refused(ErrorKind.TOO_LARGE)
    counter.refused(ErrorKind.INVALID_REQUEST)  # the metrics' reasons: both bad_request
    await counter.flush()
    await counter.flush()  # nothing new: nothing written
    assert ledger.calls == ["add_denials"]
    hour = this_hour()
    assert await ledger.denials(since=hour) == [
        DenialCount(hour, "auth", 1000),
        DenialCount(hour, "bad_request", 2),
        DenialCount(hour, "budget", 1),
    ]


async def test_a_failed_flush_keeps_its_counts_for_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ledger = FakeLedger()
    counter = DenialCounter(ledger)
    counter.refused(ErrorKind.RATE_LIMIT)
    ledger.down = True
    await counter.flush()
    assert "recording 1 denials failed" in caplog.text
    counter.refused(ErrorKind.RATE_LIMIT)
    ledger.down = False
    await counter.flush()
    hour = this_hour()
    assert await ledger.denials(since=hour) == [DenialCount(hour, "rate_limit", 2)]


async def test_it_flushes_every_interval_and_when_it_closes() -> None:
    ledger = FakeLedger()
    async with DenialCounter(ledger, interval=0.01) as counter:
        counter.refused(ErrorKind.PERMISSION)
        with anyio.fail_after(5):
            while not ledger.denial_counts:  # noqa: ASYNC110 (the flush is a timer's)
                await anyio.sleep(0.01)
        counter.refused(ErrorKind.PERMISSION)
    hour = this_hour()
    assert await ledger.denials(since=hour) == [DenialCount(hour, "forbidden", 2)]


@pytest.mark.parametrize("interval", [0, -1, True, "10"])
def test_the_interval_must_be_positive(interval: object) -> None:
    with pytest.raises(ConfigurationError, match="interval"):
        DenialCounter(FakeLedger(), interval=interval)  # type: ignore[arg-type]


async def test_the_middleware_counts_refusals_and_nothing_else(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    mode = make_mode()
    ledger = mode.ledger
    assert isinstance(ledger, DenialStore)
    counter = DenialCounter(ledger)
    key, record = await make_key()
    await ledger.set_budget(f"key:{record.key_id}", limit=Decimal(0), period=Period())

    async def endpoint(request: Request) -> Response:
        await get_settlement(request).on_success(Usage(1, 1))
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])],
        middleware=[Middleware(GatewayMiddleware, mode=mode, denials=counter)],
    )
    free, _ = await make_key("bob")
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        url = "/v1/chat/completions"
        assert (await http.post(url, json=chat(), headers=bearer("gk_wrong"))).status_code == 401
        assert (await http.post(url, json=chat(), headers=bearer(key))).status_code == 402
        assert (await http.post(url, content=b"{", headers=bearer(free))).status_code == 400
        assert (await http.post(url, json=chat(), headers=bearer(free))).status_code == 200
    await counter.flush()
    assert [(d.reason, d.count) for d in await ledger.denials(since=this_hour())] == [
        ("auth", 1),
        ("bad_request", 1),
        ("budget", 1),
    ]
