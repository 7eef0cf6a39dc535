"""Registers PostgresLedger with the shared conformance suite (one fresh schema per test).

Also holds the helpers the Postgres-specific tests share: the test DSN and a context
manager that creates an empty schema and drops it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.ledger.backends import Backend, Clock, Opener, register

__all__ = ["DSN", "fresh_schema"]

DSN = os.environ.get("GATEWAYKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@contextlib.asynccontextmanager
async def fresh_schema(prefix: str = "gk_test") -> AsyncIterator[str]:
    """A new, empty schema name on the test server; dropped (with its tables) afterwards."""
    import asyncpg

    name = f"{prefix}_{secrets.token_hex(6)}"
    conn: Any = await asyncpg.connect(DSN)
    try:
        await conn.execute(f'CREATE SCHEMA "{name}"')
        yield name
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await conn.close()


@contextlib.asynccontextmanager
async def _postgres(clock: Clock, tmp_path: Path) -> AsyncIterator[Opener]:
    from gatewaykit.ledger.postgres import PostgresLedger

    async with fresh_schema() as schema:
        yield lambda: PostgresLedger(DSN, schema=schema, pool_max=4, clock=clock)


register(Backend("postgres", _postgres, persistent=True, marks=(pytest.mark.postgres,)))
