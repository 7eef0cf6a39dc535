"""The upstream clients: default_client's pool limits reach aiohttp; exceptions are mapped."""

from __future__ import annotations

import aiohttp
import httpx
import pytest
import respx

from gatewaykit.errors import (
    ConfigurationError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamResponseTooLarge,
    UpstreamTimeoutError,
)
from gatewaykit.http import (
    AiohttpClient,
    HttpxClient,
    Timeouts,
    UpstreamClient,
    as_upstream_client,
    default_client,
    post,
)

pytestmark = pytest.mark.anyio

SECRET = "sk-secret-0123456789"


@pytest.mark.parametrize(("given", "limit"), [(None, 0), (1000, 1000), (5, 5)])
async def test_max_connections_is_the_connector_limit(given: int | None, limit: int) -> None:
    # None is unbounded: aiohttp's limit=0, not its default of 100.
    async with default_client(max_connections=given) as client:
        connector = client.session.connector
        assert isinstance(connector, aiohttp.TCPConnector)
        assert connector.limit == limit


async def test_keepalive_expiry_reaches_the_connector() -> None:
    async with default_client(keepalive_expiry=7.0) as client:
        assert client.session.connector._keepalive_timeout == 7.0  # type: ignore[union-attr]


async def test_the_shared_client_keeps_no_cookies() -> None:
    # One client serves every user: a provider's cookie must not stick to it.
    async with default_client() as client:
        assert isinstance(client.session.cookie_jar, aiohttp.DummyCookieJar)


def test_zero_connections_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        default_client(max_connections=0)


def test_timeouts_are_validated() -> None:
    with pytest.raises(ConfigurationError, match="read_timeout"):
        Timeouts(read=0)


def test_clients_are_recognised() -> None:
    plain = httpx.AsyncClient()
    wrapped = as_upstream_client(plain)
    assert isinstance(wrapped, HttpxClient)
    assert wrapped.client is plain
    native = default_client()
    assert as_upstream_client(native) is native
    assert isinstance(native, UpstreamClient)
    with pytest.raises(ConfigurationError, match="UpstreamClient"):
        as_upstream_client(object())


async def test_aiohttp_connect_error_is_mapped_without_its_text() -> None:
    async with AiohttpClient() as client:
        with pytest.raises(UpstreamConnectError) as caught:
            await client.request(
                "POST",
                "http://127.0.0.1:9/v1/chat/completions",  # discard port: refused
                body=b"{}",
                headers={"authorization": f"Bearer {SECRET}"},
                timeouts=Timeouts(connect=2),
            )
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("error", "mapped"),
    [
        (httpx.ConnectError("refused"), UpstreamConnectError),
        (httpx.ConnectTimeout("slow"), UpstreamConnectError),
        (httpx.ReadTimeout("slow"), UpstreamTimeoutError),
        (httpx.RemoteProtocolError(f"Illegal header value b'Bearer {SECRET}'"), UpstreamError),
        (httpx.DecodingError(f"bad gzip {SECRET}"), UpstreamError),
        (UnicodeEncodeError("ascii", SECRET, 0, 1, "not ascii"), UpstreamError),
    ],
)
async def test_httpx_errors_are_mapped_by_class_without_their_text(
    error: Exception, mapped: type[Exception]
) -> None:
    async with httpx.AsyncClient() as plain:
        client = HttpxClient(plain)
        with respx.mock:
            respx.post("https://provider.example/v1/x").mock(side_effect=error)
            with pytest.raises(mapped) as caught:
                await client.request(
                    "POST",
                    "https://provider.example/v1/x",
                    body=b"{}",
                    headers={},
                    timeouts=Timeouts(),
                )
    assert type(caught.value) is mapped
    assert SECRET not in str(caught.value)


async def test_post_reads_a_capped_answer() -> None:
    async with httpx.AsyncClient() as plain:
        client = HttpxClient(plain)
        with respx.mock:
            respx.post("https://cp.example/v1/resolve").mock(
                return_value=httpx.Response(200, json={"ok": True}, headers={"Retry-After": "3"})
            )
            status, headers, data = await post(
                client, "https://cp.example/v1/resolve", b"{}", headers={}, timeouts=Timeouts()
            )
            assert (status, headers["retry-after"], data) == (200, "3", b'{"ok":true}')
            respx.post("https://cp.example/v1/big").mock(
                return_value=httpx.Response(200, content=b"x" * 100)
            )
            with pytest.raises(UpstreamResponseTooLarge):
                await post(
                    client,
                    "https://cp.example/v1/big",
                    b"{}",
                    headers={},
                    timeouts=Timeouts(),
                    limit=10,
                )
