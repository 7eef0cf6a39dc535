from __future__ import annotations

import inspect
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import httpx
import pytest

from gatewaykit.outbox import Outbox, SQLiteOutbox
from gatewaykit.testing import FakeControlPlane, serve_app

POSTGRES_DSN = os.environ.get(
    "GATEWAYKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
GATEWAY_TOKEN = "gw-secret-token"

OutboxFactory = Callable[..., Outbox]  # keyword options go to the backend (e.g. clock)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def outbox_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[OutboxFactory]:
    """Makes outboxes that all share one store (a file, or a fresh PostgreSQL table)."""
    if request.param == "sqlite":
        path = str(tmp_path / "outbox.db")
        yield lambda **options: SQLiteOutbox(path, **options)
        return
    from gatewaykit.outbox.postgres import PostgresOutbox

    table = f"gk_outbox_test_{uuid.uuid4().hex[:12]}"
    yield lambda **options: PostgresOutbox(POSTGRES_DSN, table=table, **options)
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        await conn.close()


@pytest.fixture
async def outbox(outbox_factory: OutboxFactory) -> AsyncIterator[Outbox]:
    async with outbox_factory() as box:
        yield box


@pytest.fixture
def plane() -> FakeControlPlane:
    return FakeControlPlane(gateway_token=GATEWAY_TOKEN)


@pytest.fixture
async def plane_url(plane: FakeControlPlane) -> AsyncIterator[str]:
    async with serve_app(plane.app) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


async def until(check: Callable[[], Awaitable[object] | object], within: float = 5.0) -> None:
    """Wait until ``check()`` (sync or async) is truthy; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        for _ in itertools.count():
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)
