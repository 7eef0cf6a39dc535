"""The one upstream client protocol: adapters, platform mode and the outbox sender use it.

A gateway's hot path is its upstream HTTP client (docs/performance.md), so gatewaykit talks to a
small protocol of its own rather than to one library's API: :func:`default_client` drives
aiohttp directly, and an ``httpx.AsyncClient`` or ``httpx2.AsyncClient`` (respx mocks the
former) is wrapped by :class:`~gatewaykit.http.HttpxClient`. Each implementation maps its
library's exceptions to :class:`~gatewaykit.errors.UpstreamError` explicitly, by class,
and never copies their text: transport errors quote request headers, and the gateway's
provider key is one of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from gatewaykit.errors import ConfigurationError, UpstreamResponseTooLarge

__all__ = ["Timeouts", "UpstreamClient", "UpstreamResponse", "as_upstream_client", "post"]


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds for each phase of an upstream request; None is no limit.

    ``read`` bounds the wait for each piece of the body (a silent stream), not the whole
    response; ``pool`` the wait for a free connection when the pool is full.
    """

    connect: float | None = 10.0
    read: float | None = 600.0
    write: float | None = 60.0
    pool: float | None = 30.0

    def __post_init__(self) -> None:
        for name in ("connect", "read", "write", "pool"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not value > 0):
                raise ConfigurationError(
                    f"{name}_timeout must be a positive number of seconds or None"
                )


@runtime_checkable
class UpstreamResponse(Protocol):
    """An upstream response whose body has not been read yet.

    ``headers`` looks names up case-insensitively; ``raw_headers`` are the received
    (name, value) pairs. The owner must call :meth:`aclose` (a response read to its end
    returns its connection to the pool; one closed early drops the connection).
    """

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def raw_headers(self) -> Sequence[tuple[bytes, bytes]]: ...

    async def read(self, limit: int) -> bytes:
        """The whole body; :class:`UpstreamResponseTooLarge` beyond ``limit`` bytes."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one item per network read, with any Content-Encoding
        removed (gatewaykit asks for ``identity``; a provider that compresses anyway is
        still forwarded readable)."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class UpstreamClient(Protocol):
    """Sends one request upstream and returns the response before its body is read.

    Raises :class:`~gatewaykit.errors.UpstreamError` (connect, timeout, transport) —
    never an HTTP library's own exception. Responses of any status are returned.
    """

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: Timeouts,
    ) -> UpstreamResponse: ...


def as_upstream_client(client: object) -> UpstreamClient:
    """``client`` as an :class:`UpstreamClient`: itself, or an httpx/httpx2 client wrapped."""
    from gatewaykit.http.httpx_client import HttpxClient

    if HttpxClient.wraps(client):  # first: httpx's own request() would pass the check below
        return HttpxClient(client)
    if isinstance(client, UpstreamClient):
        return client
    raise ConfigurationError(
        "client must be a gatewaykit UpstreamClient (gatewaykit.http.default_client()) or an "
        f"httpx/httpx2 AsyncClient, not {type(client).__name__}"
    )


async def post(
    client: UpstreamClient,
    url: str,
    body: bytes,
    *,
    headers: Mapping[str, str],
    timeouts: Timeouts,
    limit: int = 1024 * 1024,
) -> tuple[int, dict[str, str], bytes]:
    """POST ``body``; the status, the lower-cased headers and the whole answer.

    For the small control-plane calls (resolve, usage reports). An answer over ``limit``
    bytes is :class:`~gatewaykit.errors.UpstreamResponseTooLarge`.
    """
    response = await client.request("POST", url, body=body, headers=headers, timeouts=timeouts)
    try:
        raw = await response.read(limit)
        status = response.status
        answer_headers = {k.lower(): v for k, v in response.headers.items()}
    finally:
        await response.aclose()
    return status, answer_headers, raw


def too_large(limit: int) -> UpstreamResponseTooLarge:
    return UpstreamResponseTooLarge(f"the response is larger than {limit} bytes")
