"""gatewaykit under test: the app the gateway servers run, its ledger and its API key.

The parent (bench_gateway) makes the ledger URL (a temp SQLite file, or a fresh schema in
the local PostgreSQL) and the key; the server process provisions the key with a large
budget in its lifespan and serves ``GatewayMiddleware`` + ``StandaloneMode`` + the adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp

if TYPE_CHECKING:
    from gatewaykit.ledger.base import Ledger

__all__ = [
    "cleanup",
    "gateway_app",
    "ledger_url",
    "live_holds",
    "new_key",
    "open_target",
    "unavailable",
]

_URLS: dict[str, str] = {}  # kind -> ledger URL in use
_SCHEMAS: list[tuple[str, str]] = []  # (dsn, schema) to drop at cleanup
BUDGET_USD = Decimal("1000000000")


def unavailable(kind: str) -> str | None:
    """Why this gateway path cannot run yet (a missing module), or None."""
    try:
        import gatewaykit.adapters
        from gatewaykit import GatewayMiddleware, StandaloneMode  # noqa: F401

        gatewaykit.adapters.__name__  # noqa: B018
    except ImportError as exc:
        return f"gatewaykit is not complete here ({exc})"
    if kind == "gateway-postgres":
        try:
            from gatewaykit.ledger.postgres import PostgresLedger  # noqa: F401
        except ImportError as exc:
            return f"PostgresLedger is not importable ({exc})"
    return None


def open_target(target: str) -> Ledger:
    """A ledger for a target made by :func:`ledger_url` (``URL`` or ``URL#schema=NAME``)."""
    from gatewaykit.ledger.url import open_ledger

    url, _, schema = target.partition("#schema=")
    return open_ledger(url, schema=schema) if schema else open_ledger(url)


def new_key() -> str:
    from gatewaykit.keys import generate_key

    return generate_key().key


def ledger_url(kind: str, tmpdir: str, dsn: str, *, fresh: bool = False) -> str | None:
    """A ledger URL for this run: a new SQLite file, or a new schema in PostgreSQL."""
    if kind == "gateway-sqlite":
        url = "sqlite:///" + os.path.join(tmpdir, f"gk-bench-{uuid.uuid4().hex[:8]}.db")
    else:
        schema = f"gk_bench_{uuid.uuid4().hex[:10]}"
        try:
            asyncio.run(_create_schema(dsn, schema))
        except Exception:  # unreachable server, auth, ...
            return None
        _SCHEMAS.append((dsn, schema))
        url = f"{dsn}#schema={schema}"
    if not fresh:
        _URLS[kind] = url
    return url


async def _create_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
    finally:
        await conn.close()


async def _drop_schemas() -> None:
    import asyncpg

    while _SCHEMAS:
        dsn, schema = _SCHEMAS.pop()
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


def cleanup() -> None:
    """Drop the PostgreSQL schemas this run made."""
    if _SCHEMAS:
        with contextlib.suppress(Exception):
            asyncio.run(_drop_schemas())


def live_holds(kind: str) -> int | None:
    """Holds still live in a gateway's ledger after the run (should be 0)."""
    url = _URLS.get(kind)
    if url is None:
        return None

    async def count() -> int:
        ledger = open_target(url)
        await ledger.open()
        try:
            return len(await ledger.holds(live_only=True))
        finally:
            await ledger.aclose()

    try:
        return asyncio.run(count())
    except Exception:
        return None


def gateway_app(kind: str, upstream: str, options: dict[str, Any]) -> ASGIApp:
    """gatewaykit as a user would mount it: Starlette + the adapters + GatewayMiddleware."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from gatewaykit import GatewayMiddleware, ModelPrice, StandaloneMode, Upstream
    from gatewaykit.adapters import default_client, gateway_routes
    from gatewaykit.keys import display_prefix, hash_key
    from gatewaykit.ledger.base import ApiKeyRecord

    ledger = open_target(options["db"])
    key: str = options["key"]
    key_id = key.split("_")[1]
    price = ModelPrice(input_per_mtok=Decimal("2.50"), output_per_mtok=Decimal("10.00"))
    mode = StandaloneMode(
        ledger,
        prices={"bench": price, "bench-hold": price},
        upstreams=[Upstream(base_url=upstream, api_key="sk-fake-upstream", provider="openai")],
    )
    client = default_client()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ledger.open()
        try:
            async with client:
                await ledger.create_key(
                    ApiKeyRecord(
                        key_id=key_id,
                        key_hash=hash_key(key),
                        prefix=display_prefix(key),
                        user="bench",
                    )
                )
                await ledger.set_budget(f"key:{key_id}", limit=BUDGET_USD)
                await ledger.set_budget("user:bench", limit=BUDGET_USD)
                yield
        finally:
            await ledger.aclose()

    return Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
        lifespan=lifespan,
    )
