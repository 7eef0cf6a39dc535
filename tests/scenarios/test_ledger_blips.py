"""The ledger failing for a moment while a request settles: the charge must not be lost
(a hold left to expire is never charged at all)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import gateway_routes
from gatewaykit.errors import LedgerUnavailableError
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.usage import Usage
from tests.asgi import call
from tests.scenarios.conftest import PRICE, new_key, spent, upstreams

pytestmark = pytest.mark.anyio


class Blipping:
    """Delegates to a real ledger; the next ``failures`` settle/release calls fail as if the
    store were briefly unreachable."""

    def __init__(self, ledger: SQLiteLedger) -> None:
        self._ledger = ledger
        self.failures = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def settle(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise LedgerUnavailableError("store briefly unreachable")
        return await self._ledger.settle(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise LedgerUnavailableError("store briefly unreachable")
        return await self._ledger.release(*args, **kwargs)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("fail", [False, True], ids=["success", "upstream-500"])
async def test_a_brief_ledger_outage_at_settlement_loses_no_charge(
    ledger: SQLiteLedger,
    client: httpx.AsyncClient,
    provider: tuple[FakeProvider, str],
    stream: bool,
    fail: bool,
) -> None:
    fake, url = provider
    fake.behavior = FakeBehavior(events=2, input_tokens=20, fail_status=500 if fail else None)
    blipping = Blipping(ledger)
    mode = StandaloneMode(blipping, prices={"test-model": PRICE}, upstreams=upstreams(url))
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    await ledger.set_budget("user:alice", limit=Decimal(1))
    key, _ = await new_key(ledger)
    blipping.failures = 2
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
    ex = await call(
        app,
        "/v1/chat/completions",
        json_body={**body, "stream": stream},
        headers={"authorization": f"Bearer {key}"},
    )
    assert ex.status == (500 if fail else 200)
    assert await ledger.holds() == []  # closed, not left to expire uncharged
    expected = Decimal(0) if fail else PRICE.cost(Usage(input_tokens=20, output_tokens=2))
    assert await spent(ledger) == expected
    assert len(await ledger.usage()) == 1
