"""A standalone gateway process whose ledger never finishes a settle, for the kill -9 test in
test_crash_before_settle.py: the adapters behind GatewayMiddleware under uvicorn, on a
SQLite ledger file.

``python -m tests.scenarios._slow_settle_child PORT DB_PATH PROVIDER_URL MARKER``

Every settle first appends its hold id to the MARKER file, then waits (an hour: until the
test kills the process), so the process dies between the upstream's answer and the
settle's commit.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import ModelPrice
from gatewaykit.upstream import Upstream

PRICE = ModelPrice(Decimal(1), Decimal(2))


class SettleHangs:
    """A real ledger whose settle announces itself in ``marker``, then never proceeds."""

    def __init__(self, ledger: SQLiteLedger, marker: str) -> None:
        self._ledger = ledger
        self._marker = marker

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def settle(self, hold_id: str, *args: Any, **kwargs: Any) -> Any:
        with open(self._marker, "a") as marker:  # noqa: ASYNC230 - one tiny line
            marker.write(f"{hold_id}\n")
        await anyio.sleep(3600)
        return await self._ledger.settle(hold_id, *args, **kwargs)


def build(db_path: str, provider_url: str, marker: str) -> Starlette:
    upstream = default_client()
    ledger = SQLiteLedger(db_path)
    mode = StandaloneMode(
        SettleHangs(ledger, marker),
        prices={"test-model": PRICE},
        upstreams=[
            Upstream(f"{provider_url}/v1", provider="openai"),
            Upstream(provider_url, provider="anthropic"),
        ],
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with upstream, ledger:
            yield

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/healthz", healthz), *gateway_routes(client=upstream)],
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
        lifespan=lifespan,
    )


if __name__ == "__main__":
    port, db_path, provider_url, marker = sys.argv[1:5]
    uvicorn.run(
        build(db_path, provider_url, marker),
        host="127.0.0.1",
        port=int(port),
        log_level="warning",
        access_log=False,
    )
