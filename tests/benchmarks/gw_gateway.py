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
from decimal import Decimal
from typing import Any

from starlette.types import ASGIApp

__all__ = ["cleanup", "gateway_app", "ledger_url", "live_holds", "new_key", "unavailable"]

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
        except (OSError, Exception):  # unreachable server, auth, ...
            return None
        _SCHEMAS.append((dsn, schema))
        sep = "&" if "?" in dsn else "?"
        url = f"{dsn}{sep}search_path={schema}"
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
        from gatewaykit.ledger.url import open_ledger

        ledger = open_ledger(url)
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
    raise NotImplementedError("wired once GatewayMiddleware, StandaloneMode and the adapters land")
