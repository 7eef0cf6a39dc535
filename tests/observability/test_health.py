"""/livez and /readyz: SQLite, a hanging store, a stuck outbox, and a PostgreSQL server
that stops letting the gateway in and then lets it back."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import httpx
import pytest
from starlette.types import Message

from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import Ledger
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.observability import HealthApp
from gatewaykit.outbox.sqlite import SQLiteOutbox
from tests.ledger.backend_postgres import DSN

pytestmark = pytest.mark.anyio


async def get(app: HealthApp, path: str, method: str = "GET") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ops") as http:
        return await http.request(method, path)


async def test_livez_readyz_and_a_ledger_that_is_gone() -> None:
    ledger = SQLiteLedger(":memory:")
    app = HealthApp(ledger=ledger, timeout=1)
    await ledger.open()
    try:
        assert (await get(app, "/livez")).json() == {"status": "ok"}
        ready = await get(app, "/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "checks": {"ledger": "ok"}}
        assert ready.headers["cache-control"] == "no-store"
    finally:
        await ledger.aclose()
    gone = await get(app, "/readyz")
    assert gone.status_code == 503
    body = gone.json()
    assert body["status"] == "unavailable"
    assert body["reason"].startswith("ledger: failed (")
    assert (await get(app, "/livez")).status_code == 200  # alive, only not ready
    assert (await get(app, "/elsewhere")).status_code == 404
    assert (await get(app, "/readyz", "POST")).status_code == 405


class Hanging:
    async def status(self, scope: str) -> None:
        await anyio.sleep_forever()


async def test_a_store_that_does_not_answer_within_the_timeout_is_not_ready() -> None:
    app = HealthApp(ledger=cast(Ledger, Hanging()), timeout=0.05)
    response = await get(app, "/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"ledger": "no answer within 0.05 s"}


async def test_a_stuck_outbox_is_not_ready() -> None:
    async with SQLiteOutbox(":memory:") as outbox:
        assert (await get(HealthApp(outbox=outbox), "/readyz")).status_code == 200
        await outbox.enqueue("req_1:1", {"status": "success"})
        fresh = HealthApp(outbox=outbox, outbox_stuck_after=3600)
        assert (await get(fresh, "/readyz")).status_code == 200
        stuck = HealthApp(outbox=outbox, outbox_stuck_after=1e-9)
        response = await get(stuck, "/readyz")
    assert response.status_code == 503
    assert response.json()["reason"].startswith("outbox: stuck: the oldest usage report")


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        HealthApp(timeout=0)
    with pytest.raises(ConfigurationError):
        HealthApp(outbox_stuck_after=-1)


@pytest.fixture
async def gateway_role() -> AsyncIterator[tuple[str, Any]]:
    """A role of its own owning a fresh schema, and an admin connection to lock it out."""
    import asyncpg

    role = f"gk_health_{secrets.token_hex(4)}"
    admin: Any = await asyncpg.connect(DSN)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    await admin.execute(f'CREATE SCHEMA "{role}" AUTHORIZATION "{role}"')
    database = await admin.fetchval("SELECT current_database()")
    await admin.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')  # the migration
    try:
        yield role, admin
    finally:
        await admin.execute(f'ALTER ROLE "{role}" LOGIN')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f'DROP SCHEMA IF EXISTS "{role}" CASCADE')
        await admin.execute(f'DROP OWNED BY "{role}"')  # and its grant on the database
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


@pytest.mark.postgres
async def test_readyz_follows_a_postgres_server_that_locks_the_gateway_out_and_back_in(
    gateway_role: tuple[str, Any],
) -> None:
    from gatewaykit.ledger.postgres import PostgresLedger

    role, admin = gateway_role
    user_dsn = DSN.replace("postgresql://postgres@", f"postgresql://{role}@")
    assert user_dsn != DSN, "the test DSN must name the postgres user"
    ledger = PostgresLedger(user_dsn, schema=role, pool_min=1, pool_max=2, connect_timeout=1)
    app = HealthApp(ledger=ledger, timeout=2)
    async with ledger:
        assert (await get(app, "/readyz")).status_code == 200
        # The database goes away for this gateway: its sessions are ended, new ones refused.
        await admin.execute(f'ALTER ROLE "{role}" NOLOGIN')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        gone = await get(app, "/readyz")
        assert gone.status_code == 503
        assert gone.json()["checks"]["ledger"] != "ok"
        assert role not in gone.text  # class names only: no host, user or DSN
        # And comes back.
        await admin.execute(f'ALTER ROLE "{role}" LOGIN')
        back = await get(app, "/readyz")
        assert back.status_code == 200, back.text


async def test_the_apps_answer_lifespan_and_ignore_other_scopes() -> None:
    app = HealthApp()
    assert "HealthApp" in repr(app)
    messages: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    await app({"type": "websocket"}, receive, send)
    assert len(sent) == 2
    head = await get(app, "/livez", "HEAD")
    assert head.status_code == 200
    assert head.content == b""
