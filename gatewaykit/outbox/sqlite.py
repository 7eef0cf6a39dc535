# ruff: noqa: S608  -- the only interpolated name is the table, checked by validate_table.
"""The SQLite outbox (aiosqlite): the embedded default, one file next to the gateway.

WAL with ``synchronous=FULL``: an enqueue that returned is on disk, so a killed process
loses nothing. Every statement that changes rows runs in ``BEGIN IMMEDIATE`` under one
lock, so a claim's select-then-lease is atomic even when two processes share the file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import aiosqlite
import anyio

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox.base import OutboxItem, validate_key, validate_table

__all__ = ["SQLiteOutbox"]

_COLUMNS = "idempotency_key, payload, enqueued_at, attempts, last_error, dead_at"


class SQLiteOutbox:
    """A durable outbox in a SQLite file (``":memory:"`` keeps it in memory, for tests).

    ``synchronous`` is SQLite's ``PRAGMA synchronous`` (``FULL`` survives power loss,
    ``NORMAL`` survives a process crash). ``busy_timeout`` is how long to wait for another
    process's write lock, in seconds.
    """

    def __init__(
        self,
        path: str,
        *,
        table: str = "gatewaykit_outbox",
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise ConfigurationError(f"SQLiteOutbox needs a file path or ':memory:', got {path!r}")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"unknown SQLite synchronous mode {synchronous!r}")
        self.path = path
        self.table = validate_table(table)
        self._synchronous = synchronous.upper()
        self._busy_ms = int(busy_timeout * 1000)
        self._db: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"SQLiteOutbox({self.path!r}, table={self.table!r})"

    @property
    def is_open(self) -> bool:
        return self._db is not None

    async def open(self) -> None:
        if self._db is not None:
            return
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            if self.path != ":memory:":
                await db.execute("PRAGMA journal_mode = WAL")
            await db.execute(f"PRAGMA synchronous = {self._synchronous}")
            await db.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                " idempotency_key TEXT PRIMARY KEY,"
                " payload TEXT NOT NULL,"
                " enqueued_at REAL NOT NULL,"
                " next_attempt_at REAL NOT NULL,"
                " attempts INTEGER NOT NULL DEFAULT 0,"
                " last_error TEXT,"
                " dead_at REAL)"
            )
            await db.execute(
                f"CREATE INDEX IF NOT EXISTS {self.table}_due "
                f"ON {self.table} (next_attempt_at) WHERE dead_at IS NULL"
            )
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()

    async def __aenter__(self) -> SQLiteOutbox:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise ConfigurationError(
                "the outbox is not open: enter it (or the PlatformMode using it) with "
                "`async with` in the app's lifespan"
            )
        return self._db

    async def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        db = self._conn()
        with anyio.CancelScope(shield=True):
            async with self._lock:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    cursor = await db.execute(sql, params)
                    count = cursor.rowcount
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
        return count

    async def enqueue(self, key: str, payload: Mapping[str, Any]) -> bool:
        validate_key(key)
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        now = time.time()
        count = await self._write(
            f"INSERT INTO {self.table} (idempotency_key, payload, enqueued_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
            (key, text, now, now),
        )
        return count == 1

    async def claim(self, *, limit: int, lease: float, due_only: bool = True) -> list[OutboxItem]:
        db = self._conn()
        now = time.time()
        due = "AND next_attempt_at <= ?" if due_only else ""
        params: tuple[Any, ...] = (now, limit) if due_only else (limit,)
        with anyio.CancelScope(shield=True):
            async with self._lock:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    cursor = await db.execute(
                        f"SELECT {_COLUMNS} FROM {self.table} WHERE dead_at IS NULL {due} "
                        "ORDER BY enqueued_at, idempotency_key LIMIT ?",
                        params,
                    )
                    rows = list(await cursor.fetchall())
                    if rows:
                        marks = ",".join("?" * len(rows))
                        await db.execute(
                            f"UPDATE {self.table} SET next_attempt_at = ? "
                            f"WHERE idempotency_key IN ({marks})",
                            (now + lease, *(row[0] for row in rows)),
                        )
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
        return [_item(row) for row in rows]

    async def ack(self, key: str) -> None:
        await self._write(f"DELETE FROM {self.table} WHERE idempotency_key = ?", (key,))

    async def retry_later(self, key: str, *, delay: float, error: str) -> None:
        await self._write(
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = ?, "
            "next_attempt_at = ? WHERE idempotency_key = ? AND dead_at IS NULL",
            (error, time.time() + max(delay, 0.0), key),
        )

    async def park(self, key: str, *, error: str) -> None:
        await self._write(
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = ?, dead_at = ? "
            "WHERE idempotency_key = ? AND dead_at IS NULL",
            (error, time.time(), key),
        )

    async def reschedule_all(self) -> int:
        return await self._write(
            f"UPDATE {self.table} SET next_attempt_at = ? WHERE dead_at IS NULL",
            (time.time(),),
        )

    async def requeue_dead(self) -> int:
        return await self._write(
            f"UPDATE {self.table} SET dead_at = NULL, next_attempt_at = ? "
            "WHERE dead_at IS NOT NULL",
            (time.time(),),
        )

    async def _scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        cursor = await self._conn().execute(sql, params)
        row = await cursor.fetchone()
        return None if row is None else row[0]

    async def size(self) -> int:
        return int(await self._scalar(f"SELECT count(*) FROM {self.table} WHERE dead_at IS NULL"))

    async def dead_count(self) -> int:
        return int(
            await self._scalar(f"SELECT count(*) FROM {self.table} WHERE dead_at IS NOT NULL")
        )

    async def oldest_age(self) -> float | None:
        oldest = await self._scalar(
            f"SELECT min(enqueued_at) FROM {self.table} WHERE dead_at IS NULL"
        )
        return None if oldest is None else max(time.time() - float(oldest), 0.0)

    async def next_due_in(self) -> float | None:
        due = await self._scalar(
            f"SELECT min(next_attempt_at) FROM {self.table} WHERE dead_at IS NULL"
        )
        return None if due is None else max(float(due) - time.time(), 0.0)

    async def dead_letters(self, *, limit: int = 100) -> list[OutboxItem]:
        cursor = await self._conn().execute(
            f"SELECT {_COLUMNS} FROM {self.table} WHERE dead_at IS NOT NULL "
            "ORDER BY enqueued_at, idempotency_key LIMIT ?",
            (limit,),
        )
        return [_item(row) for row in await cursor.fetchall()]


def _item(row: Any) -> OutboxItem:
    key, payload, enqueued_at, attempts, last_error, dead_at = row
    return OutboxItem(
        key=key,
        payload=json.loads(payload),
        enqueued_at=datetime.fromtimestamp(enqueued_at, tz=timezone.utc),
        attempts=int(attempts),
        last_error=last_error,
        dead=dead_at is not None,
    )
