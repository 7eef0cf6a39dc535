"""The servers under test, one uvicorn process each (1 worker, same loop and HTTP parser for all).

Kinds:

- ``passthrough-aiohttp``: a plain pure-ASGI Starlette proxy using a raw
  ``aiohttp.ClientSession`` -- the floor (docs/performance.md).
- ``passthrough-httpx``: the same proxy using ``httpx.AsyncClient`` with the httpx-aiohttp
  transport, built exactly as gatewaykit's default client is.
- ``gateway-sqlite`` / ``gateway-postgres``: gatewaykit (``GatewayMiddleware`` +
  ``StandaloneMode`` + the adapters) with its ledger on SQLite / PostgreSQL; see
  :mod:`tests.benchmarks.gw_gateway`.

Run: ``python -m tests.benchmarks.gw_server KIND --port P --upstream http://127.0.0.1:Q/v1``.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

__all__ = ["KINDS", "build_app", "httpx_client"]

KINDS = ("passthrough-aiohttp", "passthrough-httpx", "gateway-sqlite", "gateway-postgres")
_UPSTREAM_KEY = "sk-fake-upstream"
_FORWARD = ("content-type", "accept")


def httpx_client() -> tuple[httpx.AsyncClient, str]:
    """httpx over the httpx-aiohttp transport: the first build's default client."""
    from httpx_aiohttp import AiohttpTransport

    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=1024)
    client = httpx.AsyncClient(
        transport=AiohttpTransport(limits=limits), limits=limits, timeout=httpx.Timeout(600.0)
    )
    return client, "httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport())"


def _headers(request: Request) -> dict[str, str]:
    headers = {k: v for k in _FORWARD if (v := request.headers.get(k)) is not None}
    headers["authorization"] = f"Bearer {_UPSTREAM_KEY}"
    return headers


def passthrough_aiohttp(upstream: str) -> ASGIApp:
    """The floor: Starlette route, raw aiohttp, bytes streamed through as they arrive."""
    session: aiohttp.ClientSession | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal session
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            yield

    async def proxy(request: Request) -> Response:
        assert session is not None
        body = await request.body()
        resp = await session.post(
            upstream + "/chat/completions", data=body, headers=_headers(request)
        )
        ctype = resp.headers.get("content-type", "application/json")
        if ctype.startswith("text/event-stream"):
            return StreamingResponse(
                resp.content.iter_any(),
                status_code=resp.status,
                media_type=ctype,
                background=BackgroundTask(resp.release),
            )
        data = await resp.read()
        resp.release()
        return Response(data, status_code=resp.status, media_type=ctype)

    return Starlette(
        routes=[Route("/v1/chat/completions", proxy, methods=["POST"])], lifespan=lifespan
    )


def passthrough_httpx(upstream: str, *, client: httpx.AsyncClient | None = None) -> ASGIApp:
    """The same proxy over httpx with the httpx-aiohttp transport (gatewaykit's client)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal client
        if client is None:
            client, _ = httpx_client()
        async with client:
            yield

    async def proxy(request: Request) -> Response:
        assert client is not None
        body = await request.body()
        req = client.build_request(
            "POST", upstream + "/chat/completions", content=body, headers=_headers(request)
        )
        resp = await client.send(req, stream=True)
        ctype = resp.headers.get("content-type", "application/json")
        if ctype.startswith("text/event-stream"):
            return StreamingResponse(
                resp.aiter_raw(),
                status_code=resp.status_code,
                media_type=ctype,
                background=BackgroundTask(resp.aclose),
            )
        data = await resp.aread()
        await resp.aclose()
        return Response(data, status_code=resp.status_code, media_type=ctype)

    return Starlette(
        routes=[Route("/v1/chat/completions", proxy, methods=["POST"])], lifespan=lifespan
    )


def build_app(kind: str, upstream: str, options: dict[str, Any]) -> ASGIApp:
    builders: dict[str, Callable[[], ASGIApp]] = {
        "passthrough-aiohttp": lambda: passthrough_aiohttp(upstream),
        "passthrough-httpx": lambda: passthrough_httpx(upstream),
    }
    if kind in builders:
        return builders[kind]()
    from tests.benchmarks.gw_gateway import gateway_app

    return gateway_app(kind, upstream, options)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gw_server")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL ending in /v1")
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--http", default="h11")
    parser.add_argument("--db", default="", help="ledger URL (gateway kinds)")
    parser.add_argument("--key", default="", help="API key to provision (gateway kinds)")
    parser.add_argument("--variant", default="", help="diagnostic variants (gateway kinds)")
    args = parser.parse_args(argv)

    import uvicorn

    app = build_app(
        args.kind, args.upstream, {"db": args.db, "key": args.key, "variant": args.variant}
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop=args.loop,
        http=args.http,
        workers=1,
        log_level="warning",
        access_log=False,
        backlog=4096,
        lifespan="on",
        timeout_keep_alive=60,
    )


if __name__ == "__main__":
    main()
