"""The upstream HTTP client gatewaykit recommends: httpx's API over aiohttp's transport.

httpx's own connection pool collapses under concurrency (encode/httpx#3215; DESIGN §10:
~1,500 vs ~240 requests/s at 64 concurrent streams), so :func:`default_client` keeps
``httpx.AsyncClient`` as the API — respx mocks it, users know it — and plugs in the
``httpx-aiohttp`` transport with explicit pool limits. The host enters the client in its
own lifespan (``async with default_client() as client: ...``) and hands it to the adapters.

The transport is given its own aiohttp session: left to itself, httpx-aiohttp passes no
``limit`` for ``max_connections=None`` (aiohttp then caps the pool at 100, so the 101st
concurrent stream would queue). aiohttp has no cap on idle connections, so there is no
``max_keepalive_connections``: idle connections close after ``keepalive_expiry``.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from gatewaykit.errors import ConfigurationError

__all__ = ["default_client"]


def default_client(
    *,
    max_connections: int | None = 1000,
    keepalive_expiry: float | None = 30.0,
    connect_timeout: float | None = 10.0,
    read_timeout: float | None = 600.0,
    write_timeout: float | None = 60.0,
    pool_timeout: float | None = 30.0,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` on the aiohttp transport with explicit limits and timeouts.

    ``max_connections`` bounds concurrent upstream requests (a stream holds a connection
    for its whole life, so size it to the concurrency you serve; None: unbounded).
    Idle connections are kept for reuse and closed after ``keepalive_expiry`` seconds
    (None: aiohttp's default).
    Timeouts are seconds (None: none); the adapters pass their own per request.
    """
    if max_connections is not None and max_connections < 1:
        raise ConfigurationError("max_connections must be at least 1 (or None for no limit)")
    limits = httpx.Limits(
        max_connections=max_connections,
        keepalive_expiry=keepalive_expiry,
    )
    timeout = httpx.Timeout(
        connect=connect_timeout, read=read_timeout, write=write_timeout, pool=pool_timeout
    )
    transport = AiohttpTransport(limits=limits)

    def session() -> aiohttp.ClientSession:
        # Called by the transport on its first request, inside the event loop.
        options: dict[str, Any] = {}
        if keepalive_expiry is not None:
            options["keepalive_timeout"] = keepalive_expiry
        connector = aiohttp.TCPConnector(
            limit=max_connections or 0,  # aiohttp: 0 is no limit
            ssl=transport.ssl_context,
            **options,
        )
        return aiohttp.ClientSession(connector=connector)

    transport.client = session
    client = httpx.AsyncClient(
        transport=transport,
        limits=limits,
        timeout=timeout,
        follow_redirects=False,
    )
    # httpx has no switch to turn its cookie jar off; this client is shared by every user.
    client._cookies = _NoCookies()
    return client


class _NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing.

    One upstream client serves every user, so a cookie a provider sets (load balancers do)
    must not ride along on other users' requests; skipping the jar also saves httpx's
    per-response cookie parsing, a noticeable share of a proxied request's cost.
    """

    def extract_cookies(self, response: httpx.Response) -> None:
        return None

    def set_cookie_header(self, request: httpx.Request) -> None:
        return None
