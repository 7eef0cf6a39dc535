# ruff: noqa: S608  -- the only interpolated name is the table, checked by validate_table.
"""The PostgreSQL outbox (asyncpg): for gateways that already run on PostgreSQL.

Many gateway processes may share one table. Claims use ``FOR UPDATE SKIP LOCKED`` and a
lease, so concurrent senders split the work instead of racing for it; all times come from
the database clock, so machines with skewed clocks agree on what is due.

Open admissions live in ``<table>_admissions`` and the processes' heart-beats in
``<table>_instances`` (see :class:`~gatewaykit.outbox.base.AdmissionStore`). Queueing a
report and closing its admission is one statement; recovery locks the admissions it takes
(``FOR UPDATE SKIP LOCKED``), so two processes recovering at once split them.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import asyncpg

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox.base import (
    Admission,
    OutboxItem,
    ReportBuilder,
    admission_tables,
    validate_key,
    validate_table,
)
from gatewaykit.resource import AsyncResource

__all__ = ["PostgresOutbox"]

_COLUMNS = "idempotency_key, payload, enqueued_at, attempts, last_error, dead_at"
# The database clock, unless a test pinned ``gatewaykit.now`` for the session (``clock``).
_NOW = (
    "coalesce(nullif(current_setting('gatewaykit.now', true), '')::timestamptz, clock_timestamp())"
)


class PostgresOutbox(AsyncResource):
    """A durable outbox in a PostgreSQL table (created on open if missing).

    ``dsn`` is a ``postgresql://`` URL; ``pool_options`` go to ``asyncpg.create_pool``
    (connect and command timeouts default to 10 s). ``clock`` is for tests only, as for
    ``PostgresLedger``: it replaces the database clock (seconds since the epoch).
    """

    def __init__(
        self,
        dsn: str,
        *,
        table: str = "gatewaykit_outbox",
        min_size: int = 1,
        max_size: int = 4,
        clock: Callable[[], float] | None = None,
        **pool_options: Any,
    ) -> None:
        if not isinstance(dsn, str) or not dsn.startswith(("postgresql://", "postgres://")):
            raise ConfigurationError("PostgresOutbox needs a postgresql:// URL")
        self._dsn = dsn
        self.table = validate_table(table)
        self._admissions, self._instances = admission_tables(self.table)
        # Bounded waits: a settlement enqueues while a client waits for its response.
        self._pool_options = {
            "min_size": min_size,
            "max_size": max_size,
            "timeout": 10.0,
            "command_timeout": 10.0,
            **pool_options,
        }
        if clock is not None:
            self._pool_options["setup"] = functools.partial(_pin_clock, clock)
        self._pool: asyncpg.Pool | None = None

    def __repr__(self) -> str:
        # The DSN may carry a password: show only the table.
        return f"PostgresOutbox(table={self.table!r})"

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = await asyncpg.create_pool(self._dsn, **self._pool_options)
        try:
            async with pool.acquire() as conn, conn.transaction():
                # Serialise DDL between processes starting at once.
                lock_id = zlib.crc32(f"gatewaykit:{self.table}".encode())
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_id)
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} ("
                    " idempotency_key text PRIMARY KEY,"
                    " payload text NOT NULL,"
                    " enqueued_at timestamptz NOT NULL,"
                    " next_attempt_at timestamptz NOT NULL,"
                    " attempts integer NOT NULL DEFAULT 0,"
                    " last_error text,"
                    " dead_at timestamptz)"
                )
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {self.table}_due "
                    f"ON {self.table} (next_attempt_at) WHERE dead_at IS NULL"
                )
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._admissions} ("
                    " request_id text PRIMARY KEY,"
                    " owner text NOT NULL,"
                    " admitted_at timestamptz NOT NULL,"
                    " details text NOT NULL)"
                )
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {self._admissions}_owner "
                    f"ON {self._admissions} (owner)"
                )
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._instances} ("
                    " owner text PRIMARY KEY,"
                    " started_at timestamptz NOT NULL,"
                    " heartbeat_at timestamptz NOT NULL)"
                )
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _p(self) -> asyncpg.Pool:
        if self._pool is None:
            raise ConfigurationError(
                "the outbox is not open: enter it (or the PlatformMode using it) with "
                "`async with` in the app's lifespan"
            )
        return self._pool

    @staticmethod
    def _count(status: str) -> int:
        # asyncpg returns the command tag, e.g. "UPDATE 3" or "INSERT 0 1".
        return int(status.rsplit(" ", 1)[-1])

    async def enqueue(self, key: str, payload: Mapping[str, Any]) -> bool:
        validate_key(key)
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        status = await self._p().execute(
            f"INSERT INTO {self.table} (idempotency_key, payload, enqueued_at, next_attempt_at) "
            f"VALUES ($1, $2, {_NOW}, {_NOW}) ON CONFLICT (idempotency_key) DO NOTHING",
            key,
            text,
        )
        return self._count(status) == 1

    async def claim(self, *, limit: int, lease: float, due_only: bool = True) -> list[OutboxItem]:
        due = f"AND next_attempt_at <= {_NOW}" if due_only else ""
        rows = await self._p().fetch(
            f"UPDATE {self.table} SET next_attempt_at = {_NOW} + make_interval(secs => $2) "
            f"WHERE idempotency_key IN (SELECT idempotency_key FROM {self.table} "
            f"WHERE dead_at IS NULL {due} ORDER BY enqueued_at, idempotency_key LIMIT $1 "
            f"FOR UPDATE SKIP LOCKED) RETURNING {_COLUMNS}",
            limit,
            float(lease),
        )
        items = [_item(row) for row in rows]
        items.sort(key=lambda item: (item.enqueued_at, item.key))
        return items

    async def ack(self, key: str) -> None:
        await self._p().execute(f"DELETE FROM {self.table} WHERE idempotency_key = $1", key)

    async def retry_later(self, key: str, *, delay: float, error: str) -> None:
        await self._p().execute(
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = $2, "
            f"next_attempt_at = {_NOW} + make_interval(secs => $3) "
            "WHERE idempotency_key = $1 AND dead_at IS NULL",
            key,
            error,
            max(float(delay), 0.0),
        )

    async def park(self, key: str, *, error: str) -> None:
        await self._p().execute(
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = $2, "
            f"dead_at = {_NOW} WHERE idempotency_key = $1 AND dead_at IS NULL",
            key,
            error,
        )

    async def reschedule_all(self) -> int:
        return self._count(
            await self._p().execute(
                f"UPDATE {self.table} SET next_attempt_at = {_NOW} WHERE dead_at IS NULL"
            )
        )

    async def requeue_dead(self) -> int:
        return self._count(
            await self._p().execute(
                f"UPDATE {self.table} SET dead_at = NULL, next_attempt_at = {_NOW} "
                "WHERE dead_at IS NOT NULL"
            )
        )

    # -- open admissions (AdmissionStore) ----------------------------------------------
    async def admit(self, request_id: str, details: Mapping[str, Any], *, owner: str) -> bool:
        validate_key(request_id)
        text = json.dumps(details, separators=(",", ":"), sort_keys=True)
        status = await self._p().execute(
            f"INSERT INTO {self._admissions} (request_id, owner, admitted_at, details) "
            f"VALUES ($1, $2, {_NOW}, $3) ON CONFLICT (request_id) DO NOTHING",
            request_id,
            owner,
            text,
        )
        return self._count(status) == 1

    async def complete(self, request_id: str, key: str, payload: Mapping[str, Any]) -> bool:
        validate_key(key)
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        # One statement: the report is inserted only if the admission was still open (a
        # concurrent recovery holds its row lock until it commits, then this finds nothing).
        closed = await self._p().fetchval(
            f"WITH closed AS (DELETE FROM {self._admissions} WHERE request_id = $1 "
            "RETURNING request_id), "
            f"queued AS (INSERT INTO {self.table} "
            "(idempotency_key, payload, enqueued_at, next_attempt_at) "
            f"SELECT $2, $3, {_NOW}, {_NOW} FROM closed "
            "ON CONFLICT (idempotency_key) DO NOTHING RETURNING 1) "
            "SELECT count(*) FROM closed",
            request_id,
            key,
            text,
        )
        return int(closed) == 1

    async def recover(
        self, report: ReportBuilder, *, stale_after: float, owner: str | None = None
    ) -> list[str]:
        admissions, instances = self._admissions, self._instances
        cutoff = f"{_NOW} - make_interval(secs => $2)"
        async with self._p().acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"SELECT a.request_id, a.owner, a.admitted_at, a.details FROM {admissions} a "
                f"LEFT JOIN {instances} i ON i.owner = a.owner "
                f"WHERE a.owner = $1 OR coalesce(i.heartbeat_at, a.admitted_at) < {cutoff} "
                "ORDER BY a.admitted_at, a.request_id FOR UPDATE OF a SKIP LOCKED",
                owner,
                float(stale_after),
            )
            keys: list[str] = []
            payloads: list[str] = []
            for row in rows:
                key, payload = report(_admission(row))
                keys.append(validate_key(key))
                payloads.append(json.dumps(payload, separators=(",", ":"), sort_keys=True))
            if rows:
                await conn.execute(
                    f"INSERT INTO {self.table} "
                    "(idempotency_key, payload, enqueued_at, next_attempt_at) "
                    f"SELECT k, p, {_NOW}, {_NOW} FROM unnest($1::text[], $2::text[]) AS r(k, p) "
                    "ON CONFLICT (idempotency_key) DO NOTHING",
                    keys,
                    payloads,
                )
                await conn.execute(
                    f"DELETE FROM {admissions} WHERE request_id = ANY($1::text[])",
                    [row["request_id"] for row in rows],
                )
            await conn.execute(
                f"DELETE FROM {instances} i WHERE i.heartbeat_at < "
                f"{_NOW} - make_interval(secs => $1) AND NOT EXISTS "
                f"(SELECT 1 FROM {admissions} a WHERE a.owner = i.owner)",
                float(stale_after),
            )
        return keys

    async def heartbeat(self, owner: str) -> None:
        await self._p().execute(
            f"INSERT INTO {self._instances} (owner, started_at, heartbeat_at) "
            f"VALUES ($1, {_NOW}, {_NOW}) "
            "ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            owner,
        )

    async def retire(self, owner: str) -> None:
        await self._p().execute(f"DELETE FROM {self._instances} WHERE owner = $1", owner)

    async def admissions(self, *, limit: int = 100) -> list[Admission]:
        rows = await self._p().fetch(
            f"SELECT request_id, owner, admitted_at, details FROM {self._admissions} "
            "ORDER BY admitted_at, request_id LIMIT $1",
            limit,
        )
        return [_admission(row) for row in rows]

    async def admission_count(self) -> int:
        return int(await self._p().fetchval(f"SELECT count(*) FROM {self._admissions}"))

    # -- reads -------------------------------------------------------------------------
    async def size(self) -> int:
        value = await self._p().fetchval(f"SELECT count(*) FROM {self.table} WHERE dead_at IS NULL")
        return int(value)

    async def dead_count(self) -> int:
        value = await self._p().fetchval(
            f"SELECT count(*) FROM {self.table} WHERE dead_at IS NOT NULL"
        )
        return int(value)

    async def oldest_age(self) -> float | None:
        value = await self._p().fetchval(
            f"SELECT extract(epoch FROM {_NOW} - min(enqueued_at))::float8 "
            f"FROM {self.table} WHERE dead_at IS NULL"
        )
        return None if value is None else max(float(value), 0.0)

    async def next_due_in(self) -> float | None:
        value = await self._p().fetchval(
            f"SELECT extract(epoch FROM min(next_attempt_at) - {_NOW})::float8 "
            f"FROM {self.table} WHERE dead_at IS NULL"
        )
        return None if value is None else max(float(value), 0.0)

    async def dead_letters(self, *, limit: int = 100) -> list[OutboxItem]:
        rows = await self._p().fetch(
            f"SELECT {_COLUMNS} FROM {self.table} WHERE dead_at IS NOT NULL "
            "ORDER BY enqueued_at, idempotency_key LIMIT $1",
            limit,
        )
        return [_item(row) for row in rows]


def _item(row: Any) -> OutboxItem:
    return OutboxItem(
        key=row["idempotency_key"],
        payload=json.loads(row["payload"]),
        enqueued_at=row["enqueued_at"],
        attempts=int(row["attempts"]),
        last_error=row["last_error"],
        dead=row["dead_at"] is not None,
    )


def _admission(row: Any) -> Admission:
    return Admission(
        request_id=row["request_id"],
        owner=row["owner"],
        admitted_at=row["admitted_at"],
        details=json.loads(row["details"]),
    )


async def _pin_clock(clock: Callable[[], float], conn: Any) -> None:
    """Pin the session's ``gatewaykit.now`` to the test clock on every acquire (the pool
    resets it on release)."""
    now = datetime.fromtimestamp(clock(), timezone.utc).isoformat()
    await conn.execute("SELECT set_config('gatewaykit.now', $1, false)", now)
