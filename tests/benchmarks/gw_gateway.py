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
from urllib.parse import parse_qsl, urlencode

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
    if kind.startswith("gateway-postgres"):
        try:
            from gatewaykit.ledger.postgres import PostgresLedger  # noqa: F401
        except ImportError as exc:
            return f"PostgresLedger is not importable ({exc})"
    return None


def open_target(target: str) -> Ledger:
    """A ledger for a target made by :func:`ledger_url` (``URL`` or ``URL#schema=NAME``)."""
    from gatewaykit.ledger.url import open_ledger

    url, _, options = target.partition("#")
    return open_ledger(url, **dict(parse_qsl(options)))


def new_key() -> str:
    from gatewaykit.keys import generate_key

    return generate_key().key


def ledger_url(path: str, tmpdir: str, dsn: str, *, fresh: bool = False) -> str | None:
    """A ledger target for this run: a new SQLite file or a new PostgreSQL schema.

    The target is a ledger URL plus ``#name=value&...`` options for the backend (the
    PostgreSQL schema, SQLite's ``synchronous`` for the ``normal`` variant).
    """
    kind, _, variant = path.partition(":")
    variants = set(variant.split(",")) if variant else set()
    options: dict[str, str] = {}
    if kind == "gateway-sqlite":
        if "memory" in variants:
            url = "sqlite://:memory:"
        else:
            url = "sqlite:///" + os.path.join(tmpdir, f"gk-bench-{uuid.uuid4().hex[:8]}.db")
        if "normal" in variants:
            options["synchronous"] = "NORMAL"
    else:
        schema = f"gk_bench_{uuid.uuid4().hex[:10]}"
        try:
            asyncio.run(_create_schema(dsn, schema))
        except Exception:  # unreachable server, auth, ...
            return None
        _SCHEMAS.append((dsn, schema))
        url = dsn
        options["schema"] = schema
    target = url + ("#" + urlencode(options) if options else "")
    if not fresh:
        _URLS[path] = target
    return target


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
    if url is None or ":memory:" in url:
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


def gateway_app(
    kind: str, upstream: str, options: dict[str, Any], *, client: Any = None
) -> ASGIApp:
    """gatewaykit as a user would mount it: Starlette + the adapters + GatewayMiddleware.

    ``client`` replaces gatewaykit's default client (the in-process benchmark passes a
    mock-transport client). ``options["metrics"]`` / ``options["tracing"]``, when given,
    are passed to the middleware (bench_metrics).
    """
    from starlette.applications import Starlette
    from starlette.middleware import Middleware

    from gatewaykit import GatewayMiddleware, ModelPrice, StandaloneMode, Upstream
    from gatewaykit.adapters import default_client, gateway_routes
    from gatewaykit.keys import display_prefix, hash_key
    from gatewaykit.ledger.base import ApiKeyRecord
    from gatewaykit.runtime import tune_gc

    ledger = open_target(options["db"])
    key: str = options["key"]
    key_id = key.split("_")[1]
    price = ModelPrice(input_per_mtok=Decimal("2.50"), output_per_mtok=Decimal("10.00"))
    variants = set(options.get("variant", "").split(","))
    limiter: Any = None
    if "redis" in variants:  # rate limits counted in Redis (bench_ratelimit)
        from gatewaykit.ratelimit.redis import RedisRateLimiter

        limiter = RedisRateLimiter.from_url(options["redis"])
    limited = "limits" in variants or limiter is not None
    mode = StandaloneMode(
        ledger,
        prices={"bench": price, "bench-hold": price},
        upstreams=[Upstream(base_url=upstream, api_key="sk-fake-upstream", provider="openai")],
        budget_headers="nohdr" not in variants,
        # Limits high enough never to refuse: what checking them costs.
        default_rpm=10**9 if limited else None,
        default_tpm=10**9 if limited else None,
        rate_limiter=limiter,
    )
    client = default_client() if client is None else client

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await ledger.open()
        try:
            async with client:
                if await ledger.find_key(hash_key(key)) is None:
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
                if "gcdefault" not in variants:  # as gatewaykit serve runs it
                    tune_gc()
                yield
        finally:
            await ledger.aclose()

    return Starlette(
        routes=gateway_routes(client=client),
        middleware=[
            Middleware(
                GatewayMiddleware,
                mode=mode,
                metrics=options.get("metrics"),
                tracing=options.get("tracing"),
            )
        ],
        lifespan=lifespan,
    )
