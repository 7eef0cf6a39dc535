"""A platform-mode gateway process for test_crash_recovery: the adapters behind
GatewayMiddleware under uvicorn, reporting through a durable outbox.

``python -m tests.platform._gateway_child PORT PLANE_URL OUTBOX_URL TABLE LEASE``
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gatewaykit import GatewayMiddleware, PlatformMode
from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.outbox import RetryPolicy, open_outbox

GATEWAY_TOKEN = "gw-secret-token"


def build(plane_url: str, outbox_url: str, table: str, lease: float) -> Starlette:
    upstream = default_client()
    plane = httpx.AsyncClient()
    mode = PlatformMode(
        base_url=plane_url,
        gateway_token=GATEWAY_TOKEN,
        client=plane,
        outbox=open_outbox(outbox_url, table=table),
        retry=RetryPolicy(initial_delay=0.05, max_delay=0.2),
        admission_lease=lease,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with upstream, plane, mode:
            yield

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/healthz", healthz), *gateway_routes(client=upstream)],
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
        lifespan=lifespan,
    )


if __name__ == "__main__":
    port, plane_url, outbox_url, table, lease = sys.argv[1:6]
    uvicorn.run(
        build(plane_url, outbox_url, table, float(lease)),
        host="127.0.0.1",
        port=int(port),
        log_level="warning",
        access_log=False,
    )
