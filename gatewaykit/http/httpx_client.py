"""An ``httpx.AsyncClient`` or ``httpx2.AsyncClient`` as an upstream client.

For hosts that already have one (respx mocks httpx in tests; the official SDKs moved to
httpx2). Exceptions are mapped by the classes of the client's own library, found from the
client's module: httpx and httpx2 have parallel exception trees.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from gatewaykit.errors import UpstreamConnectError, UpstreamError, UpstreamTimeoutError
from gatewaykit.http.base import Timeouts, too_large

__all__ = ["HttpxClient"]

_LIBRARIES = ("httpx", "httpx2")


class HttpxClient:
    """Wraps an httpx/httpx2 ``AsyncClient``; the host owns (and closes) the client."""

    def __init__(self, client: Any) -> None:
        library = _library(client)
        if library is None:
            raise TypeError(f"not an httpx or httpx2 AsyncClient: {type(client).__name__}")
        self.client = client
        self._connect = (library.ConnectError, library.ConnectTimeout, library.PoolTimeout)
        self._timeout = (library.TimeoutException,)
        # RequestError covers TransportError and DecodingError (a body that will not
        # decode); InvalidURL and ValueError (a header value the library refuses) too.
        self._transport = (library.RequestError, library.StreamError, library.InvalidURL)
        self._library = library
        self._timeouts: dict[Timeouts, Any] = {}
        self._urls: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<HttpxClient {type(self.client).__module__}.{type(self.client).__name__}>"

    @staticmethod
    def wraps(client: object) -> bool:
        """Whether ``client`` is an httpx or httpx2 ``AsyncClient``."""
        return _library(client) is not None

    def _mapped(self, exc: Exception) -> UpstreamError:
        name = type(exc).__name__
        if isinstance(exc, self._connect):
            return UpstreamConnectError("could not connect", cause=name)
        if isinstance(exc, self._timeout):
            return UpstreamTimeoutError("timed out", cause=name)
        if isinstance(exc, (*self._transport, OSError, ValueError)):
            return UpstreamError("the connection failed", cause=name)
        raise exc

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: Timeouts,
    ) -> _Response:
        timeout = self._timeouts.get(timeouts)
        if timeout is None:
            timeout = self._timeouts[timeouts] = self._library.Timeout(
                connect=timeouts.connect,
                read=timeouts.read,
                write=timeouts.write,
                pool=timeouts.pool,
            )
        try:
            # Parsing a URL string is a noticeable share of a request's cost in httpx.
            parsed = self._urls.get(url)
            if parsed is None:
                parsed = self._library.URL(url)
                if len(self._urls) < 1024:
                    self._urls[url] = parsed
            request = self.client.build_request(
                method, parsed, content=body, headers=headers, timeout=timeout
            )
            response = await self.client.send(request, stream=True)
        except Exception as exc:
            raise self._mapped(exc) from None
        return _Response(response, self)


class _Response:
    __slots__ = ("_client", "_response")

    def __init__(self, response: Any, client: HttpxClient) -> None:
        self._response = response
        self._client = client

    @property
    def status(self) -> int:
        return int(self._response.status_code)

    @property
    def headers(self) -> Mapping[str, str]:
        headers: Mapping[str, str] = self._response.headers
        return headers

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]:
        raw: Sequence[tuple[bytes, bytes]] = self._response.headers.raw
        return raw

    async def read(self, limit: int) -> bytes:
        # Decoded bytes (the answer is re-sent with its own length and no encoding);
        # aiter_bytes also serves a body that was read before (a mock's reused response).
        parts: list[bytes] = []
        size = 0
        iterator = self._response.aiter_bytes()
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return b"".join(parts)
            except Exception as exc:
                raise self._client._mapped(exc) from None
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                raise too_large(limit)

    async def chunks(self) -> AsyncIterator[bytes]:
        # Decoded, as aiohttp's are: the bytes are forwarded without a Content-Encoding.
        iterator = self._response.aiter_bytes()
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise self._client._mapped(exc) from None
            yield chunk

    async def aclose(self) -> None:
        await self._response.aclose()


def _library(client: object) -> Any:
    # A client of either library means the library is imported already.
    for name in _LIBRARIES:
        library = sys.modules.get(name)
        if library is not None and isinstance(client, library.AsyncClient):
            return library
    return None
