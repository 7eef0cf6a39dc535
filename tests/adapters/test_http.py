"""default_client's pool limits reach aiohttp's connector (they did not: issue in perf notes)."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.http import default_client
from gatewaykit.testing import FakeProvider
from tests.adapters.conftest import CHAT

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


async def test_keepalive_settings_reach_the_connector() -> None:
    async with default_client(max_keepalive_connections=3, keepalive_expiry=7.0) as client:
        connector = _connector(client)
        assert connector.max_idle == 3
        assert connector._keepalive_timeout == 7.0


async def test_idle_connections_beyond_the_cap_are_closed(
    provider: tuple[FakeProvider, str],
) -> None:
    _, url = provider
    body = CHAT.body(stream=False)
    headers = {"authorization": "Bearer sk-upstream"}
    async with default_client(max_keepalive_connections=1) as client:

        async def one() -> None:
            response = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 200

        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(one)
        connector = _connector(client)
        assert len(connector._acquired) == 0
        assert connector.idle == 1


def test_negative_keepalive_cap_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        default_client(max_keepalive_connections=-1)
