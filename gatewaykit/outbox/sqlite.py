# ruff: noqa: S608  -- the only interpolated name is the table, checked by validate_table.
"""The SQLite outbox: the embedded default, one file next to the gateway.

WAL with ``synchronous=FULL``: an enqueue that returned is on disk, so a killed process
loses nothing. The connection is used from one worker thread at a time, each operation a
single hop to that thread. Concurrent writes are *group-committed*: the writes that
arrive while one transaction commits go into the next transaction together, so many
reports share one fsync. ``BEGIN IMMEDIATE`` keeps a claim's select-then-lease atomic even
when two processes share the file.

Open admissions live in ``<table>_admissions`` and the heart-beats of the processes using
the file in ``<table>_instances`` (see :class:`~gatewaykit.outbox.base.AdmissionStore`). An
admission is one group-committed insert; queueing its report and closing it is one
group-committed write of two statements, in the same transaction.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

import anyio
import anyio.to_thread

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

__all__ = ["SQLiteOutbox"]

_COLUMNS = "idempotency_key, payload, enqueued_at, attempts, last_error, dead_at"
_T = TypeVar("_T")
_Statement = tuple[str, tuple[Any, ...]]
#: One caller's write: statements that commit (or fail) together, in order.
_Op = tuple[_Statement, ...]


class SQLiteOutbox(AsyncResource):
    """A durable outbox in a SQLite file (``":memory:"`` keeps it in memory, for tests).

    ``synchronous`` is SQLite's ``PRAGMA synchronous`` (``FULL`` survives power loss,
    ``NORMAL`` survives a process crash and is several times faster). ``busy_timeout`` is
    how long to wait for another process's write lock, in seconds. ``clock`` is the store
    clock (seconds since the epoch; default :func:`time.time`), as for ``SQLiteLedger``:
    tests pass a fake one and move it instead of sleeping.
    """

    def __init__(
        self,
        path: str,
        *,
        table: str = "gatewaykit_outbox",
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise ConfigurationError(f"SQLiteOutbox needs a file path or ':memory:', got {path!r}")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(f"unknown SQLite synchronous mode {synchronous!r}")
        self.path = path
        self.table = validate_table(table)
        self._admissions, self._instances = admission_tables(self.table)
        self._synchronous = synchronous.upper()
        self._busy_ms = int(busy_timeout * 1000)
        self.clock: Callable[[], float] = clock or time.time
        self._db: sqlite3.Connection | None = None
        self._thread = anyio.CapacityLimiter(1)
        self._lock = anyio.Lock()
        self._batch = _Batch()

    def __repr__(self) -> str:
        return f"SQLiteOutbox({self.path!r}, table={self.table!r})"

    @property
    def is_open(self) -> bool:
        return self._db is not None

    async def open(self) -> None:
        if self._db is None:
            self._db = await anyio.to_thread.run_sync(self._connect, limiter=self._thread)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {self._synchronous}")
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} ("
                " idempotency_key TEXT PRIMARY KEY,"
                " payload TEXT NOT NULL,"
                " enqueued_at REAL NOT NULL,"
                " next_attempt_at REAL NOT NULL,"
                " attempts INTEGER NOT NULL DEFAULT 0,"
                " last_error TEXT,"
                " dead_at REAL)"
            )
            db.execute(
                f"CREATE INDEX IF NOT EXISTS {self.table}_due "
                f"ON {self.table} (next_attempt_at) WHERE dead_at IS NULL"
            )
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {self._admissions} ("
                " request_id TEXT PRIMARY KEY,"
                " owner TEXT NOT NULL,"
                " admitted_at REAL NOT NULL,"
                " details TEXT NOT NULL)"
            )
            db.execute(
                f"CREATE INDEX IF NOT EXISTS {self._admissions}_owner ON {self._admissions} (owner)"
            )
            db.execute(
                f"CREATE TABLE IF NOT EXISTS {self._instances} ("
                " owner TEXT PRIMARY KEY,"
                " started_at REAL NOT NULL,"
                " heartbeat_at REAL NOT NULL)"
            )
        except BaseException:
            db.close()
            raise
        return db

    async def aclose(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    await anyio.to_thread.run_sync(db.close, limiter=self._thread)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ConfigurationError(
                "the outbox is not open: enter it (or the PlatformMode using it) with "
                "`async with` in the app's lifespan"
            )
        return self._db

    async def _in_thread(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        db = self._conn()
        return await anyio.to_thread.run_sync(fn, db, limiter=self._thread)

    # -- writes (group-committed) ------------------------------------------------------
    async def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run one statement durably; concurrent writes share one commit. Its row count."""
        [count] = await self._write_all(((sql, params),))
        return count

    async def _write_all(self, statements: _Op) -> tuple[int, ...]:
        """Run ``statements`` durably, all or none; concurrent writes share one commit.

        The first writer of a batch waits for the lock, then commits every write that
        joined the batch meanwhile in one transaction. Returns each statement's row count.
        """
        self._conn()
        batch = self._batch
        index = len(batch.ops)
        batch.ops.append(statements)
        with anyio.CancelScope(shield=True):
            if index == 0:
                async with self._lock:
                    self._batch = _Batch()
                    try:
                        batch.results = await self._in_thread(lambda db: _commit(db, batch.ops))
                    except BaseException as exc:
                        batch.error = exc
                        raise
                    finally:
                        batch.done.set()
            else:
                await batch.done.wait()
        if batch.error is not None:
            raise batch.error
        result = batch.results[index]
        if isinstance(result, Exception):
            raise result
        return result

    async def enqueue(self, key: str, payload: Mapping[str, Any]) -> bool:
        validate_key(key)
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        now = self.clock()
        count = await self._write(
            f"INSERT INTO {self.table} (idempotency_key, payload, enqueued_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING",
            (key, text, now, now),
        )
        return count == 1

    async def claim(self, *, limit: int, lease: float, due_only: bool = True) -> list[OutboxItem]:
        due = "AND next_attempt_at <= ?" if due_only else ""
        select = (
            f"SELECT {_COLUMNS} FROM {self.table} WHERE dead_at IS NULL {due} "
            "ORDER BY enqueued_at, idempotency_key LIMIT ?"
        )

        def run(db: sqlite3.Connection) -> list[Any]:
            now = self.clock()
            db.execute("BEGIN IMMEDIATE")
            try:
                params = (now, limit) if due_only else (limit,)
                rows = db.execute(select, params).fetchall()
                if rows:
                    marks = ",".join("?" * len(rows))
                    db.execute(
                        f"UPDATE {self.table} SET next_attempt_at = ? "
                        f"WHERE idempotency_key IN ({marks})",
                        (now + lease, *(row[0] for row in rows)),
                    )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return rows

        with anyio.CancelScope(shield=True):
            async with self._lock:
                rows = await self._in_thread(run)
        return [_item(row) for row in rows]

    async def ack(self, key: str) -> None:
        await self._write(f"DELETE FROM {self.table} WHERE idempotency_key = ?", (key,))

    async def retry_later(self, key: str, *, delay: float, error: str) -> None:
        await self._write(
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = ?, "
            "next_attempt_at = ? WHERE idempotency_key = ? AND dead_at IS NULL",
            (error, self.clock() + max(delay, 0.0), key),
        )

    async def park(self, key: str, *, error: str) -> None:
        await self._write(
            f"UPDATE {self.table} SET attempts = attempts + 1, last_error = ?, dead_at = ? "
            "WHERE idempotency_key = ? AND dead_at IS NULL",
            (error, self.clock(), key),
        )

    async def reschedule_all(self) -> int:
        return await self._write(
            f"UPDATE {self.table} SET next_attempt_at = ? WHERE dead_at IS NULL",
            (self.clock(),),
        )

    async def requeue_dead(self) -> int:
        return await self._write(
            f"UPDATE {self.table} SET dead_at = NULL, next_attempt_at = ? "
            "WHERE dead_at IS NOT NULL",
            (self.clock(),),
        )

    # -- open admissions (AdmissionStore) ----------------------------------------------
    async def admit(self, request_id: str, details: Mapping[str, Any], *, owner: str) -> bool:
        validate_key(request_id)
        text = json.dumps(details, separators=(",", ":"), sort_keys=True)
        count = await self._write(
            f"INSERT INTO {self._admissions} (request_id, owner, admitted_at, details) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
            (request_id, owner, self.clock(), text),
        )
        return count == 1

    async def complete(self, request_id: str, key: str, payload: Mapping[str, Any]) -> bool:
        validate_key(key)
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        now = self.clock()
        _, closed = await self._write_all(
            (
                (
                    f"INSERT INTO {self.table} "
                    "(idempotency_key, payload, enqueued_at, next_attempt_at) "
                    f"SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM {self._admissions} "
                    "WHERE request_id = ?) ON CONFLICT (idempotency_key) DO NOTHING",
                    (key, text, now, now, request_id),
                ),
                (f"DELETE FROM {self._admissions} WHERE request_id = ?", (request_id,)),
            )
        )
        return closed == 1

    async def recover(
        self, report: ReportBuilder, *, stale_after: float, owner: str | None = None
    ) -> list[str]:
        admissions, instances = self._admissions, self._instances
        select = (
            f"SELECT a.request_id, a.owner, a.admitted_at, a.details FROM {admissions} a "
            f"LEFT JOIN {instances} i ON i.owner = a.owner "
            "WHERE a.owner = ? OR coalesce(i.heartbeat_at, a.admitted_at) < ? "
            "ORDER BY a.admitted_at, a.request_id"
        )
        stale_instance = f"SELECT 1 FROM {instances} WHERE heartbeat_at < ? LIMIT 1"
        insert = (
            f"INSERT INTO {self.table} (idempotency_key, payload, enqueued_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (idempotency_key) DO NOTHING"
        )

        def run(db: sqlite3.Connection) -> list[str]:
            cutoff = self.clock() - stale_after
            params = (owner, cutoff)  # owner None: "a.owner = NULL" matches nothing
            if (
                db.execute(select + " LIMIT 1", params).fetchone() is None
                and db.execute(stale_instance, (cutoff,)).fetchone() is None
            ):
                return []  # the usual case: no write lock taken, nothing committed
            db.execute("BEGIN IMMEDIATE")
            try:
                keys = []
                now = self.clock()
                for request_id, row_owner, admitted_at, details in db.execute(
                    select, params
                ).fetchall():
                    admission = Admission(
                        request_id=request_id,
                        owner=row_owner,
                        admitted_at=datetime.fromtimestamp(admitted_at, tz=timezone.utc),
                        details=json.loads(details),
                    )
                    key, payload = report(admission)
                    text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
                    db.execute(insert, (validate_key(key), text, now, now))
                    db.execute(f"DELETE FROM {admissions} WHERE request_id = ?", (request_id,))
                    keys.append(key)
                db.execute(
                    f"DELETE FROM {instances} WHERE heartbeat_at < ? AND NOT EXISTS "
                    f"(SELECT 1 FROM {admissions} a WHERE a.owner = {instances}.owner)",
                    (cutoff,),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return keys

        with anyio.CancelScope(shield=True):
            async with self._lock:
                keys = await self._in_thread(run)
        return keys

    async def heartbeat(self, owner: str) -> None:
        now = self.clock()
        await self._write(
            f"INSERT INTO {self._instances} (owner, started_at, heartbeat_at) VALUES (?, ?, ?) "
            "ON CONFLICT (owner) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
            (owner, now, now),
        )

    async def retire(self, owner: str) -> None:
        await self._write(f"DELETE FROM {self._instances} WHERE owner = ?", (owner,))

    async def admissions(self, *, limit: int = 100) -> list[Admission]:
        sql = (
            f"SELECT request_id, owner, admitted_at, details FROM {self._admissions} "
            "ORDER BY admitted_at, request_id LIMIT ?"
        )
        rows = await self._in_thread(lambda db: db.execute(sql, (limit,)).fetchall())
        return [
            Admission(
                request_id=request_id,
                owner=owner,
                admitted_at=datetime.fromtimestamp(admitted_at, tz=timezone.utc),
                details=json.loads(details),
            )
            for request_id, owner, admitted_at, details in rows
        ]

    async def admission_count(self) -> int:
        return int(await self._scalar(f"SELECT count(*) FROM {self._admissions}"))

    # -- reads -------------------------------------------------------------------------
    async def _scalar(self, sql: str) -> Any:
        row = await self._in_thread(lambda db: db.execute(sql).fetchone())
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
        return None if oldest is None else max(self.clock() - float(oldest), 0.0)

    async def next_due_in(self) -> float | None:
        due = await self._scalar(
            f"SELECT min(next_attempt_at) FROM {self.table} WHERE dead_at IS NULL"
        )
        return None if due is None else max(float(due) - self.clock(), 0.0)

    async def dead_letters(self, *, limit: int = 100) -> list[OutboxItem]:
        sql = (
            f"SELECT {_COLUMNS} FROM {self.table} WHERE dead_at IS NOT NULL "
            "ORDER BY enqueued_at, idempotency_key LIMIT ?"
        )
        rows = await self._in_thread(lambda db: db.execute(sql, (limit,)).fetchall())
        return [_item(row) for row in rows]


class _Batch:
    """Writes waiting to be committed together, and their results."""

    __slots__ = ("done", "error", "ops", "results")

    def __init__(self) -> None:
        self.ops: list[_Op] = []
        self.results: list[tuple[int, ...] | Exception] = []
        self.error: BaseException | None = None
        self.done = anyio.Event()


def _transaction(db: sqlite3.Connection, ops: Sequence[_Op]) -> list[tuple[int, ...]]:
    db.execute("BEGIN IMMEDIATE")
    try:
        counts = [tuple(db.execute(sql, params).rowcount for sql, params in op) for op in ops]
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return counts


def _commit(db: sqlite3.Connection, ops: list[_Op]) -> list[tuple[int, ...] | Exception]:
    """Commit ``ops`` together; if that fails, each alone, so one bad write spoils only
    itself. Each result is the op's row counts, or the exception its caller will raise."""
    try:
        return list(_transaction(db, ops))
    except Exception as exc:
        if len(ops) == 1:
            return [exc]
    results: list[tuple[int, ...] | Exception] = []
    for op in ops:
        try:
            results.extend(_transaction(db, [op]))
        except Exception as exc:
            results.append(exc)
    return results


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
