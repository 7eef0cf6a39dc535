"""The default upstream client: aiohttp, driven directly.

aiohttp's pool holds up under concurrency where httpx's collapses (encode/httpx#3215), and
without an httpx layer over it a proxied request costs about half the CPU (docs/performance.md:
the httpx-over-aiohttp passthrough ran at 0.46× the raw-aiohttp floor). The session is
created on first use inside the running loop, or when the client is entered; the host
closes it in its lifespan (``async with default_client() as client: ...``).

One client serves every user, so it keeps no cookies (a load balancer's cookie must not
ride along on another user's request) and never follows redirects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp

from gatewaykit.errors import (
    ConfigurationError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gatewaykit.http.base import Timeouts, too_large
from gatewaykit.resource import AsyncResource

__all__ = ["AiohttpClient", "default_client"]


def default_client(
    *, max_connections: int | None = 1000, keepalive_expiry: float | None = 30.0
) -> AiohttpClient:
    """The recommended upstream client (aiohttp), with explicit pool limits.

    ``max_connections`` bounds concurrent upstream requests (a stream holds a connection
    for its whole life, so size it to the concurrency you serve; None: unbounded). Idle
    connections close after ``keepalive_expiry`` seconds. Timeouts are per request: the
    adapters pass their own.
    """
    return AiohttpClient(max_connections=max_connections, keepalive_expiry=keepalive_expiry)


class AiohttpClient(AsyncResource):
    """An :class:`~gatewaykit.http.UpstreamClient` on one ``aiohttp.ClientSession``."""

    def __init__(
        self, *, max_connections: int | None = 1000, keepalive_expiry: float | None = 30.0
    ) -> None:
        if max_connections is not None and (
            isinstance(max_connections, bool) or max_connections < 1
        ):
            raise ConfigurationError("max_connections must be at least 1 (or None for no limit)")
        if keepalive_expiry is not None and not keepalive_expiry > 0:
            raise ConfigurationError("keepalive_expiry must be a positive number or None")
        self.max_connections = max_connections
        self.keepalive_expiry = keepalive_expiry
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[Timeouts, aiohttp.ClientTimeout] = {}

    def __repr__(self) -> str:
        state = "open" if self._session is not None and not self._session.closed else "idle"
        return f"<AiohttpClient max_connections={self.max_connections} {state}>"

    @property
    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session, created on first use (inside the running loop)."""
        session = self._session
        if session is None or session.closed:
            options: dict[str, Any] = {}
            if self.keepalive_expiry is not None:
                options["keepalive_timeout"] = self.keepalive_expiry
            connector = aiohttp.TCPConnector(
                limit=self.max_connections or 0,  # aiohttp: 0 is no limit
                limit_per_host=0,
                **options,
            )
            session = self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent",),
            )
        return session

    async def open(self) -> None:
        """Create the session now (it is otherwise made on first use)."""
        _ = self.session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _timeout(self, timeouts: Timeouts) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            pool, connect = timeouts.pool, timeouts.connect
            timeout = self._timeouts[timeouts] = aiohttp.ClientTimeout(
                total=None,
                connect=None if pool is None or connect is None else pool + connect,
                sock_connect=connect,
                sock_read=timeouts.read,
            )
        return timeout

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: Timeouts,
    ) -> _Response:
        try:
            response = await self.session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=self._timeout(timeouts),
                allow_redirects=False,
            )
        except Exception as exc:
            raise _mapped(exc) from None
        return _Response(response)


class _Response:
    __slots__ = ("_response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    @property
    def status(self) -> int:
        return self._response.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self._response.headers

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self._response.raw_headers

    async def read(self, limit: int) -> bytes:
        content = self._response.content
        try:
            data = await content.read(limit + 1)
            if len(data) <= limit and not content.at_eof():
                parts = [data]
                size = len(data)
                while size <= limit:
                    part = await content.read(limit + 1 - size)
                    if not part:
                        break
                    parts.append(part)
                    size += len(part)
                data = b"".join(parts)
        except Exception as exc:
            raise _mapped(exc) from None
        if len(data) > limit:
            raise too_large(limit)
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        read = self._response.content.readany
        while True:
            try:
                chunk = await read()
            except Exception as exc:
                raise _mapped(exc) from None
            if not chunk:
                return
            yield chunk

    async def aclose(self) -> None:
        response = self._response
        if response.content.at_eof():
            response.release()  # read to the end: the connection goes back to the pool
        else:
            response.close()


def _mapped(exc: BaseException) -> UpstreamError:
    """aiohttp's exceptions as gatewaykit's, by class; the text stays out (it may quote
    request headers)."""
    name = type(exc).__name__
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return UpstreamConnectError("could not connect", cause=name)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return UpstreamTimeoutError("timed out", cause=name)
    if isinstance(exc, (aiohttp.ClientError, OSError, ValueError)):
        # ValueError: aiohttp refuses a URL or header value it cannot send.
        return UpstreamError("the connection failed", cause=name)
    raise exc
