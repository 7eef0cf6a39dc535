"""The upstream HTTP client gatewaykit recommends: httpx's API over aiohttp's transport.

httpx's own connection pool collapses under concurrency (encode/httpx#3215; DESIGN §10:
~1,500 vs ~240 requests/s at 64 concurrent streams), so :func:`default_client` keeps
``httpx.AsyncClient`` as the API — respx mocks it, users know it — and plugs in the
``httpx-aiohttp`` transport with explicit pool limits. The host enters the client in its
own lifespan (``async with default_client() as client: ...``) and hands it to the adapters.

The transport is given its own aiohttp session: left to itself, httpx-aiohttp passes no
``limit`` for ``max_connections=None`` (aiohttp then caps the pool at 100, so the 101st
concurrent stream would queue) and ignores ``max_keepalive_connections``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from gatewaykit.errors import ConfigurationError

if TYPE_CHECKING:
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ConnectionKey

__all__ = ["default_client"]


def default_client(
    *,
    max_connections: int | None = 1000,
    max_keepalive_connections: int | None = 200,
    keepalive_expiry: float | None = 30.0,
    connect_timeout: float | None = 10.0,
    read_timeout: float | None = 600.0,
    write_timeout: float | None = 60.0,
    pool_timeout: float | None = 30.0,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` on the aiohttp transport with explicit limits and timeouts.

    ``max_connections`` bounds concurrent upstream requests (a stream holds a connection
    for its whole life, so size it to the concurrency you serve; None: unbounded).
    ``max_keepalive_connections`` bounds the idle connections kept for reuse (None: all
    of them), each closed after ``keepalive_expiry`` seconds idle (None: never).
    Timeouts are seconds (None: none); the adapters pass their own per request.
    """
    if max_connections is not None and max_connections < 1:
        raise ConfigurationError("max_connections must be at least 1 (or None for no limit)")
    if max_keepalive_connections is not None and max_keepalive_connections < 0:
        raise ConfigurationError("max_keepalive_connections must be >= 0 (or None for no limit)")
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive_connections,
        keepalive_expiry=keepalive_expiry,
    )
    timeout = httpx.Timeout(
        connect=connect_timeout, read=read_timeout, write=write_timeout, pool=pool_timeout
    )
    transport = AiohttpTransport(limits=limits)

    def session() -> aiohttp.ClientSession:
        # Called by the transport on its first request, inside the event loop.
        connector = _Connector(
            max_idle=max_keepalive_connections,
            limit=max_connections or 0,  # aiohttp: 0 is no limit
            keepalive_timeout=keepalive_expiry,
            ssl=transport.ssl_context,
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


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, keeping at most ``max_idle`` idle connections for reuse.

    aiohttp itself keeps every released connection until its keep-alive expires; a
    connection released beyond the cap is closed instead.
    """

    def __init__(self, *, max_idle: int | None, **options: Any) -> None:
        super().__init__(**options)
        self.max_idle = max_idle

    @property
    def idle(self) -> int:
        """How many connections wait for reuse."""
        return sum(len(conns) for conns in self._conns.values())

    def _release(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        if self.max_idle is not None and not should_close:
            should_close = self.idle >= self.max_idle
        super()._release(key, protocol, should_close=should_close)


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
