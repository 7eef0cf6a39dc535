"""default_client's pool limits reach aiohttp's connector (they did not: issue in perf notes)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.http import default_client

pytestmark = pytest.mark.anyio


def _connector(client: httpx.AsyncClient) -> Any:
    transport: Any = client._transport
    if callable(transport.client):
        transport.client = transport.get_client()
    return transport.client.connector


@pytest.mark.parametrize(("given", "limit"), [(None, 0), (1000, 1000), (5, 5)])
async def test_max_connections_is_the_connector_limit(given: int | None, limit: int) -> None:
    # None is unbounded: aiohttp's limit=0, not its default of 100.
    async with default_client(max_connections=given) as client:
        connector = _connector(client)
        assert connector.limit == limit


async def test_keepalive_expiry_reaches_the_connector() -> None:
    async with default_client(keepalive_expiry=7.0) as client:
        assert _connector(client)._keepalive_timeout == 7.0


def test_zero_connections_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        default_client(max_connections=0)
