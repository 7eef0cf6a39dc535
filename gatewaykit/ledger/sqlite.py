# SQL text is assembled only from constant column lists and "?" placeholders.
# ruff: noqa: S608
"""SQLiteLedger: the embedded default ledger, durable and group-committed.

One dedicated writer thread owns a stdlib ``sqlite3`` connection. Operations from any
number of tasks are queued; the writer drains the queue and runs everything waiting in
ONE ``BEGIN IMMEDIATE … COMMIT`` (one fsync). Within a batch, the hot operations decide
against an in-memory view of the store and their writes go out together before COMMIT;
if any operation raises, the batch is rolled back and redone with each operation in its
own ``SAVEPOINT``, so a conflict or refused write undoes only that operation. Callers are
resolved only after COMMIT succeeded; a failed commit fails every operation of its batch.
One fsync per batch instead of one per operation is what makes durable settings fast
(docs/ledger.md has the figures).

The ledger is meant for one gateway process per database file (other processes work
through SQLite's file lock, serialised); never put the file on a network filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal, TypeVar

from gatewaykit.errors import (
    BudgetExceeded,
    ConcurrencyExceeded,
    ConfigurationError,
    GatewayKitError,
    HoldClosedError,
    HoldConflictError,
    HoldNotFoundError,
    LedgerError,
    LedgerUnavailableError,
)
from gatewaykit.ledger._sqlite_schema import (
    DAY_SQL,
    ROLLUP_AGGREGATES,
    ROLLUP_SUMS,
    ROLLUP_UPSERT,
    prepare,
)
from gatewaykit.ledger.base import (
    DENIAL_RETENTION,
    ApiKeyRecord,
    BudgetStatus,
    DenialCount,
    Hold,
    HoldState,
    OutputFit,
    Period,
    ResponseContext,
    UsageFilter,
    UsageGroup,
    UsageRecord,
    UsageTotal,
    sort_totals,
    validate_context_id,
    validate_denial_range,
    validate_denials,
    validate_fit,
    validate_hold_id,
    validate_key_limits,
    validate_limit,
    validate_max_live,
    validate_record,
    validate_scopes,
    validate_ttl,
    validate_usage_filter,
    validate_usage_groups,
    whole_days,
)
from gatewaykit.money import from_nanos, to_nanos
from gatewaykit.resource import AsyncResource

__all__ = ["SQLiteLedger"]

logger = logging.getLogger("gatewaykit.ledger")

T = TypeVar("T")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH_DAY = date(1970, 1, 1)
_NO_PERIOD = Period()
_STATES = {s.value: s for s in HoldState}
_HOLD_COLUMNS = "hold_id, scopes, amount, state, created_at, expires_at, charged, overrun, late"
_USAGE_COLUMNS = (
    "request_id, key_id, user, model, endpoint, status, usage_source, input_tokens, "
    "output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos, error, latency_ms, "
    "created_at"
)
_DAY_US = 86_400_000_000
#: A usage record as a row of usage_daily (the parts ``usage_totals`` sums).
_RECORD_AS_DAILY = (
    f"{DAY_SQL} AS day, user, key_id, model, 1 AS requests, input_tokens, output_tokens, "
    "cache_read_tokens, cache_write_tokens, cost_nanos"
)
_DAILY_COLUMNS = f"day, user, key_id, model, {', '.join(ROLLUP_SUMS)}"
#: The SQL of each ``usage_totals`` group over those parts (a day is a number since 1970).
_USAGE_GROUP_SQL: dict[str, str] = {"user": "user", "key": "key_id", "model": "model", "day": "day"}
_USAGE_SUMS = ", ".join(f"sum({c})" for c in ROLLUP_SUMS)
_USAGE_SUMS_AS = ", ".join(f"sum({c}) AS {c}" for c in ROLLUP_SUMS)
#: Records folded into the rollup per step (a sweep takes as many steps as it needs).
_ROLLUP_BATCH = 50_000
_KEY_COLUMNS = (
    "key_id, key_hash, prefix, user, team, revoked, created_at, expires_at, allowed_models, rpm, "
    "max_concurrent, tpm"
)
_MAX_BATCH = 512
#: How long a busy writer waits for more operations before it commits (seconds).
_LINGER = 0.0002
#: How often an idle writer checks whether another connection changed an API key.
_IDLE_POLL = 0.5
_MAX_CACHED = 100_000
_NEVER = 2**62
#: Expired response contexts deleted per sweep (a backlog drains over later sweeps).
_PRUNE_BATCH = 10_000
#: Stored context tokens never grow past this (an integer column must not overflow).
_MAX_CONTEXT_TOKENS = 2**53 - 1
_DENIALS_UPSERT = (
    "INSERT INTO denials (hour, reason, count) VALUES (?, ?, ?) "
    "ON CONFLICT (hour, reason) DO UPDATE SET count = count + excluded.count"
)
# $1 id, $2 owner, $3 tokens, $4 now, $5 expires at, $6 growth. A live row of the same id
# and owner grows: max(stored + growth, tokens); an expired one is replaced.
_CONTEXT_UPSERT = f"""
INSERT INTO response_contexts (context_id, owner, tokens, updated_at, expires_at)
VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (context_id, owner) DO UPDATE SET
    tokens = min(max(CASE WHEN response_contexts.expires_at > excluded.updated_at
                          THEN response_contexts.tokens + ?6 ELSE 0 END, excluded.tokens),
                 {_MAX_CONTEXT_TOKENS}),
    updated_at = excluded.updated_at,
    expires_at = excluded.expires_at
"""

HoldRow = tuple[str, str, int, str, int, int, int, int, int]


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


@functools.lru_cache(maxsize=1024)
def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _dt_us(value: datetime) -> int:
    if value.tzinfo is None:
        raise ConfigurationError(f"timestamps must be timezone-aware, got {value!r}")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _window_key(period: Period, now_us: int) -> int:
    """Start of ``period``'s window at ``now_us``, in epoch seconds (the counter key)."""
    if period.kind == "none":
        return 0
    seconds = now_us // 1_000_000
    if period.kind == "rolling":
        assert period.seconds is not None
        return seconds - seconds % period.seconds
    start, _ = period.window(_dt(now_us))
    return int((start - _EPOCH).total_seconds())


_usd = functools.lru_cache(maxsize=4096)(from_nanos)
_cached_nanos = functools.lru_cache(maxsize=4096, typed=True)(to_nanos)


def _headroom_usd(nanos: int) -> Decimal:
    """``from_nanos`` for values that seldom repeat (a budget's headroom), at a third of
    its cost: integer arithmetic and an exact string conversion, no decimal context."""
    if nanos % 1_000_000_000 == 0:
        return Decimal(nanos // 1_000_000_000)
    exp = -9
    while nanos % 10 == 0:
        nanos //= 10
        exp += 1
    return Decimal(f"{nanos}E{exp}")


def _nanos(value: object) -> int:
    """``to_nanos`` with a cache for the amounts a gateway repeats (validation included)."""
    try:
        return _cached_nanos(value)
    except TypeError:  # unhashable input: let to_nanos explain what is wrong
        return to_nanos(value)


def _hold(row: HoldRow, remaining: tuple[tuple[str, Decimal | None], ...] = ()) -> Hold:
    hold_id, scopes, amount, state, created, expires, charged, overrun, late = row
    return Hold(
        hold_id=hold_id,
        scopes=tuple(scopes.split(" ")) if scopes else (),
        amount=_usd(amount),
        state=_STATES[state],
        created_at=_dt(created),
        expires_at=_dt(expires),
        charged=_usd(charged),
        overrun=_usd(overrun),
        late=bool(late),
        remaining=remaining,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Fail:
    """An operation that committed its side effects (e.g. a reclaim) and then refuses."""

    error: GatewayKitError


class _Store:
    """The operations, run on the writer thread inside the batch transaction.

    The hot operations (reserve, settle, release, extend) decide against an in-memory
    view — SQLite's committed state plus this batch's pending changes — and queue their
    writes; :meth:`flush` writes a whole batch with a handful of ``executemany`` calls
    (counter changes summed per window) before COMMIT. Every other operation flushes
    first and then reads SQLite directly. The caches are dropped whenever another
    connection committed (``PRAGMA data_version``) or a transaction rolled back, so
    SQLite stays the only source of truth.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.c = conn
        self.budget_cache: dict[str, tuple[int | None, Period] | None] = {}
        #: (scope, window) -> [spent, reserved, live holds]: committed values plus pending
        #: changes.
        self.counters: dict[tuple[str, int], list[int]] = {}
        #: Windows whose counter row exists in the database.
        self.stored: set[tuple[str, int]] = set()
        #: Windows changed since the last flush.
        self.touched: set[tuple[str, int]] = set()
        #: Live holds (committed or pending): id -> (row, windows).
        self.live: dict[str, tuple[HoldRow, list[tuple[str, int]]]] = {}
        #: Holds to write at flush: id -> (row, windows, new?, ended_at or None = keep).
        self.dirty: dict[str, tuple[HoldRow, list[tuple[str, int]], bool, int | None]] = {}
        self.records: list[tuple[Any, ...]] = []
        #: Hold ids known not to be in the database (prefetched for a batch's reserves).
        self.absent: set[str] = set()
        #: A lower bound of every live hold's expiry (None: unknown).
        self.next_expiry: int | None = None
        #: This batch changed an API key (and bumped the stored key epoch).
        self.keys_changed = False

    def forget(self) -> None:
        """Drop every cache and pending change (after a rollback or a foreign commit)."""
        self.budget_cache.clear()
        self.counters.clear()
        self.stored.clear()
        self.touched.clear()
        self.live.clear()
        self.dirty.clear()
        self.records.clear()
        self.absent.clear()
        self.next_expiry = None

    def trim(self) -> None:
        """Keep memory bounded between batches (nothing is pending then)."""
        if len(self.counters) > _MAX_CACHED or len(self.budget_cache) > _MAX_CACHED:
            self.counters.clear()
            self.stored.clear()
            self.budget_cache.clear()

    def prefetch(self, hold_ids: list[str]) -> None:
        """One query tells which of a batch's reserve ids are new (the common case)."""
        for start in range(0, len(hold_ids), 500):
            chunk = hold_ids[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            found = {
                r[0]
                for r in self.c.execute(
                    f"SELECT hold_id FROM holds WHERE hold_id IN ({marks})", chunk
                )
            }
            self.absent.update(h for h in chunk if h not in found)

    def flush(self) -> None:
        """Write the pending changes of the hot operations."""
        c = self.c
        if self.dirty:
            inserts: list[tuple[Any, ...]] = []
            scope_rows: list[tuple[str, str, int]] = []
            updates: list[tuple[Any, ...]] = []
            for hold_id, (row, windows, new, ended) in self.dirty.items():
                if new:
                    inserts.append((*row, ended))
                    scope_rows.extend((hold_id, scope, key) for scope, key in windows)
                else:
                    updates.append((row[3], row[5], row[6], row[7], row[8], ended, hold_id))
            if inserts:
                c.executemany(
                    f"INSERT INTO holds ({_HOLD_COLUMNS}, ended_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    inserts,
                )
            if scope_rows:
                c.executemany(
                    "INSERT INTO hold_scopes (hold_id, scope, window_start) VALUES (?, ?, ?)",
                    scope_rows,
                )
            if updates:
                c.executemany(
                    "UPDATE holds SET state = ?, expires_at = ?, charged = ?, overrun = ?, "
                    "late = ?, ended_at = coalesce(ended_at, ?) WHERE hold_id = ?",
                    updates,
                )
            self.dirty.clear()
        if self.touched:
            new_rows: list[tuple[Any, ...]] = []
            changed: list[tuple[Any, ...]] = []
            for window in self.touched:
                spent, reserved, live = self.counters[window]
                if window in self.stored:
                    changed.append((spent, reserved, live, *window))
                else:
                    new_rows.append((*window, spent, reserved, live))
            if changed:
                c.executemany(
                    "UPDATE counters SET spent = ?, reserved = ?, live = ? "
                    "WHERE scope = ? AND window_start = ?",
                    changed,
                )
            if new_rows:
                c.executemany(
                    "INSERT INTO counters (scope, window_start, spent, reserved, live) "
                    "VALUES (?, ?, ?, ?, ?)",
                    new_rows,
                )
            self.stored.update(self.touched)
            self.touched.clear()
        if self.records:
            c.executemany(
                f"INSERT OR IGNORE INTO usage_records ({_USAGE_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self.records,
            )
            self.records.clear()
        self.absent.clear()

    # -- helpers -----------------------------------------------------------------------
    def budget(self, scope: str) -> tuple[int | None, Period] | None:
        """The scope's (limit, period), or None without a budget (both cached)."""
        if scope in self.budget_cache:
            return self.budget_cache[scope]
        row = self.c.execute(
            "SELECT limit_nanos, period_kind, period_seconds FROM budgets WHERE scope = ?",
            (scope,),
        ).fetchone()
        budget = None if row is None else (row[0], Period(row[1], row[2]))
        self.budget_cache[scope] = budget
        return budget

    def counter(self, scope: str, key: int) -> list[int]:
        """The window's [spent, reserved, live], loaded once; pending changes are applied."""
        cached = self.counters.get((scope, key))
        if cached is None:
            row = self.c.execute(
                "SELECT spent, reserved, live FROM counters WHERE scope = ? AND window_start = ?",
                (scope, key),
            ).fetchone()
            if row is not None:
                self.stored.add((scope, key))
            cached = self.counters[(scope, key)] = list(row) if row else [0, 0, 0]
        return cached

    def used(self, scope: str, key: int) -> int:
        """Spent plus reserved in the window."""
        counter = self.counter(scope, key)
        return counter[0] + counter[1]

    def move(
        self, windows: list[tuple[str, int]], spent: int, reserved: int, live: int = 0
    ) -> None:
        """Change the counters of ``windows``; a money total may never go negative (I9).

        The live count stops at zero instead: a count that drifted (check() reports it)
        must never stop a hold from being charged or expired.
        """
        for scope, key in windows:
            counter = self.counter(scope, key)
            counter[0] += spent
            counter[1] += reserved
            counter[2] = max(counter[2] + live, 0)
            if counter[0] < 0 or counter[1] < 0:
                raise LedgerError(
                    f"the ledger refused a change that would make {scope}'s totals negative "
                    "(invariant I9); run check() and restore the database from a backup"
                )
            self.touched.add((scope, key))

    def status(self, scope: str, now: int) -> BudgetStatus:
        limit, period = self.budget(scope) or (None, _NO_PERIOD)
        start, end = period.window(_dt(now))
        spent, reserved, _ = self.counter(scope, _window_key(period, now))
        return BudgetStatus(
            scope=scope,
            limit=None if limit is None else _usd(limit),
            period=period,
            spent=_usd(spent),
            held=_usd(reserved),
            window_start=start,
            resets_at=end,
        )

    def get(self, hold_id: str) -> HoldRow | None:
        pending = self.dirty.get(hold_id)
        if pending is not None:
            return pending[0]
        cached = self.live.get(hold_id)
        if cached is not None:
            return cached[0]
        if hold_id in self.absent:
            return None
        row: HoldRow | None = self.c.execute(
            f"SELECT {_HOLD_COLUMNS} FROM holds WHERE hold_id = ?", (hold_id,)
        ).fetchone()
        return row

    def windows(self, hold_id: str) -> list[tuple[str, int]]:
        pending = self.dirty.get(hold_id)
        if pending is not None:
            return pending[1]
        cached = self.live.get(hold_id)
        if cached is not None:
            return cached[1]
        rows: list[tuple[str, int]] = self.c.execute(
            "SELECT scope, window_start FROM hold_scopes WHERE hold_id = ?", (hold_id,)
        ).fetchall()
        return rows

    def put(
        self, row: HoldRow, windows: list[tuple[str, int]], ended: int | None, new: bool = False
    ) -> None:
        """Queue a hold's new row for the flush and keep the live-hold cache in step."""
        hold_id = row[0]
        previous = self.dirty.get(hold_id)
        if previous is not None:
            new = previous[2]
            ended = previous[3] if ended is None else ended
        self.dirty[hold_id] = (row, windows, new, ended)
        if row[3] == "held":
            if len(self.live) < _MAX_CACHED or hold_id in self.live:
                self.live[hold_id] = (row, windows)
        else:
            self.live.pop(hold_id, None)

    def end(self, row: HoldRow, state: str, now: int) -> HoldRow:
        """Move a live hold to ``state`` (released or expired), freeing its reservation."""
        windows = self.windows(row[0])
        row = (*row[:3], state, *row[4:])
        self.put(row, windows, now)
        self.move(windows, 0, -row[2], -1)
        return row

    def touch(self, row: HoldRow, now: int) -> HoldRow:
        """Expire ``row``'s hold first if its TTL has passed (no operation sees it live)."""
        if row[3] == "held" and now >= row[5]:
            return self.end(row, "expired", now)
        return row

    def reclaim(self, scopes: tuple[str, ...], now: int) -> None:
        """Expire the due holds sharing a scope with a new reserve (lazy sweeping)."""
        if self.next_expiry is not None and now < self.next_expiry:
            return
        self.flush()
        marks = ", ".join("?" * len(scopes))
        due = self.c.execute(
            f"SELECT {_HOLD_COLUMNS} FROM holds h WHERE h.state = 'held' AND "
            "h.expires_at <= ? AND EXISTS (SELECT 1 FROM hold_scopes s WHERE "
            f"s.hold_id = h.hold_id AND s.scope IN ({marks}))",
            (now, *scopes),
        ).fetchall()
        for row in due:
            self.end(row, "expired", now)
        first = self.c.execute("SELECT min(expires_at) FROM holds WHERE state = 'held'")
        value = first.fetchone()[0]  # a lower bound: holds just expired above still count
        self.next_expiry = _NEVER if value is None else value

    def record(self, record: UsageRecord | None, cost: int, now: int) -> None:
        if record is None:
            return
        self.records.append(
            (
                record.request_id,
                record.key_id,
                record.user,
                record.model,
                record.endpoint,
                record.status,
                record.usage_source,
                record.input_tokens,
                record.output_tokens,
                record.cache_read_tokens,
                record.cache_write_tokens,
                cost,
                record.error,
                record.latency_ms,
                now,
            )
        )

    # -- budgets -----------------------------------------------------------------------
    def set_budget(self, now: int, scope: str, limit: int | None, period: Period) -> BudgetStatus:
        self.flush()
        self.c.execute(
            "INSERT INTO budgets (scope, limit_nanos, period_kind, period_seconds, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope) DO UPDATE SET "
            "limit_nanos = excluded.limit_nanos, period_kind = excluded.period_kind, "
            "period_seconds = excluded.period_seconds, updated_at = excluded.updated_at",
            (scope, limit, period.kind, period.seconds, now),
        )
        self.budget_cache[scope] = (limit, period)
        return self.status(scope, now)

    def delete_budget(self, now: int, scope: str) -> bool:
        self.flush()
        self.budget_cache[scope] = None
        return self.c.execute("DELETE FROM budgets WHERE scope = ?", (scope,)).rowcount > 0

    def get_status(self, now: int, scope: str) -> BudgetStatus | None:
        self.flush()
        known = (
            self.budget(scope) is not None
            or self.c.execute("SELECT 1 FROM counters WHERE scope = ? LIMIT 1", (scope,)).fetchone()
        )
        return self.status(scope, now) if known else None

    def all_budgets(self, now: int) -> list[BudgetStatus]:
        self.flush()
        rows = self.c.execute(
            "SELECT scope FROM budgets UNION SELECT scope FROM counters ORDER BY scope"
        ).fetchall()
        return [self.status(r[0], now) for r in rows]

    # -- holds -------------------------------------------------------------------------
    def reserve(
        self,
        now: int,
        hold_id: str,
        scopes: tuple[str, ...],
        amount: int,
        ttl: int,
        fit: OutputFit | None = None,
        caps: tuple[tuple[str, int], ...] = (),
    ) -> Hold | _Fail:
        text = " ".join(scopes)
        row = self.get(hold_id)
        if row is not None:
            if row[3] == "released" and not row[1]:
                return _hold(row)  # a tombstone: the release came first
            smallest = amount if fit is None else fit.nanos(fit.min_tokens)
            if row[1] != text or not smallest <= row[2] <= amount:
                raise HoldConflictError(
                    f"hold {hold_id!r} was reserved with other scopes or another amount; "
                    "use a fresh hold id for a new request"
                )
            return _hold(self.touch(row, now))
        self.reclaim(scopes, now)
        for scope, most in caps:  # requests in flight, before the budgets (429 before 402)
            live = self.live_holds(scope)
            if live >= most:
                return _Fail(ConcurrencyExceeded(scope=scope, limit=most, live=live))
        if fit is not None:
            amount = self.fitted(scopes, amount, fit, now)
        windows = []
        limits = []
        for scope in scopes:
            limit, period = self.budget(scope) or (None, _NO_PERIOD)
            key = _window_key(period, now)
            limits.append(limit)
            if limit is not None:
                spent, reserved, _ = self.counter(scope, key)
                if spent + reserved + amount > limit:
                    return _Fail(
                        BudgetExceeded(
                            scope=scope,
                            limit=_usd(limit),
                            spent=_usd(spent),
                            held=_usd(reserved),
                            requested=_usd(amount),
                            resets_at=period.window(_dt(now))[1],
                        )
                    )
            windows.append((scope, key))
        expires = now + ttl
        row = (hold_id, text, amount, "held", now, expires, 0, 0, 0)
        self.put(row, windows, None, new=True)
        self.move(windows, 0, amount, 1)
        if self.next_expiry is not None:
            self.next_expiry = min(self.next_expiry, expires)
        # The counters now include this hold: the headroom a gateway reports, for free.
        remaining = tuple(
            (scope, None if limit is None else _headroom_usd(limit - self.used(scope, key)))
            for (scope, key), limit in zip(windows, limits, strict=True)
        )
        return _hold(row, remaining)

    def live_holds(self, scope: str) -> int:
        """The scope's live holds in all its windows: stored counts, or this batch's."""
        rows = self.c.execute(
            "SELECT window_start, live FROM counters WHERE scope = ? AND live > 0", (scope,)
        ).fetchall()
        stored = {(scope, key): live for key, live in rows}
        stored.update((w, c[2]) for w, c in self.counters.items() if w[0] == scope)
        return sum(stored.values())

    def fitted(self, scopes: tuple[str, ...], amount: int, fit: OutputFit, now: int) -> int:
        """The hold a fitted reserve tries: ``amount`` if the tightest budget has room for
        it, else the largest fitting hold, else the smallest (which is then refused)."""
        rooms = []
        for scope in scopes:
            limit, period = self.budget(scope) or (None, _NO_PERIOD)
            if limit is not None:
                rooms.append(limit - self.used(scope, _window_key(period, now)))
        if not rooms or min(rooms) >= amount:
            return amount
        tokens = fit.tokens_within(min(rooms))
        return fit.nanos(fit.min_tokens if tokens is None else tokens)

    def settle(
        self, now: int, hold_id: str, actual: int, record: UsageRecord | None, cost: int
    ) -> Hold:
        row = self.get(hold_id)
        if row is None:
            raise HoldNotFoundError(f"no hold {hold_id!r}; reserve before settling")
        row = self.touch(row, now)
        state = row[3]
        if state == "settled":
            if row[6] != actual:
                raise HoldConflictError(
                    f"hold {hold_id!r} was already settled at ${_usd(row[6])}, not ${_usd(actual)}"
                )
            return _hold(row)
        if state == "released":
            return _hold(row)
        late = state == "expired"
        amount = row[2]
        overrun = max(0, actual - amount)
        windows = self.windows(hold_id)
        row = (*row[:3], "settled", row[4], row[5], actual, overrun, int(late))
        self.put(row, windows, None if late else now)
        self.move(windows, actual, 0 if late else -amount, 0 if late else -1)
        self.record(record, cost, now)
        return _hold(row)

    def release(self, now: int, hold_id: str, record: UsageRecord | None, cost: int) -> Hold:
        row = self.get(hold_id)
        if row is None:
            row = (hold_id, "", 0, "released", now, now, 0, 0, 0)
            self.put(row, [], now, new=True)
            self.record(record, cost, now)
            return _hold(row)
        row = self.touch(row, now)
        if row[3] != "held":
            return _hold(row)
        row = self.end(row, "released", now)
        self.record(record, cost, now)
        return _hold(row)

    def extend(self, now: int, hold_id: str, ttl: int) -> Hold | _Fail:
        row = self.get(hold_id)
        if row is None:
            raise HoldNotFoundError(f"no hold {hold_id!r}")
        row = self.touch(row, now)
        if row[3] != "held":
            return _Fail(HoldClosedError(f"hold {hold_id!r} is {row[3]}; it cannot be extended"))
        row = (*row[:5], max(row[5], now + ttl), *row[6:])
        self.put(row, self.windows(hold_id), None)
        return _hold(row)

    def get_hold(self, now: int, hold_id: str) -> Hold | None:
        row = self.get(hold_id)
        return None if row is None else _hold(row)

    def list_holds(self, now: int, live_only: bool, limit: int) -> list[Hold]:
        self.flush()
        where = "WHERE state = 'held' " if live_only else ""
        rows = self.c.execute(
            f"SELECT {_HOLD_COLUMNS} FROM holds {where}ORDER BY seq DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [_hold(r) for r in rows]

    def sweep(self, now: int) -> int:
        self.flush()
        due = self.c.execute(
            f"SELECT {_HOLD_COLUMNS} FROM holds WHERE state = 'held' AND expires_at <= ?", (now,)
        ).fetchall()
        for row in due:
            self.end(self.get(row[0]) or row, "expired", now)
        self.next_expiry = None
        return len(due)

    def rollup(self, now: int, limit: int) -> int:
        """Fold up to ``limit`` records past the watermark into usage_daily; return how
        many seq values the watermark moved.

        Safe without a margin: this runs in the only write transaction SQLite allows, so
        every record up to ``max(seq)`` is committed (or commits with this one), and a
        later record gets a larger rowid (records are never deleted).
        """
        self.flush()
        (mark,) = self.c.execute("SELECT seq FROM usage_rollup").fetchone()
        (top,) = self.c.execute("SELECT coalesce(max(seq), 0) FROM usage_records").fetchone()
        upto = min(top, mark + limit)
        if upto <= mark:
            return 0
        self.c.execute(ROLLUP_UPSERT, (mark, upto))
        self.c.execute("UPDATE usage_rollup SET seq = ?", (upto,))
        return int(upto - mark)

    def check(self, now: int) -> list[str]:
        self.flush()
        c = self.c
        since_day = now // _DAY_US - 1  # integers: formatted into the SQL below
        since_us = since_day * _DAY_US
        problems: list[str] = []
        expected: dict[tuple[str, int], tuple[int, int, int]] = {
            (scope, key): (live, charged, count)
            for scope, key, live, charged, count in c.execute(
                "SELECT s.scope, s.window_start, "
                "sum(CASE WHEN h.state = 'held' THEN h.amount ELSE 0 END), "
                "sum(CASE WHEN h.state = 'settled' THEN h.charged ELSE 0 END), "
                "sum(h.state = 'held') "
                "FROM hold_scopes s JOIN holds h ON h.hold_id = s.hold_id "
                "GROUP BY s.scope, s.window_start"
            )
        }
        counters = c.execute("SELECT scope, window_start, spent, reserved, live FROM counters")
        for scope, key, spent, reserved, held in counters:
            live, charged, count = expected.pop((scope, key), (0, 0, 0))
            where = f"{scope} (window starting {_dt(key * 1_000_000).isoformat()})"
            if reserved != live:
                problems.append(
                    f"I2: {where} has reserved {reserved} nano-USD but its live holds total {live}"
                )
            if held != count:
                problems.append(f"I2: {where} counts {held} live holds but has {count}")
            if spent != charged:
                problems.append(
                    f"I3: {where} has spent {spent} nano-USD but its settled "
                    f"holds charged {charged}"
                )
            if spent < 0 or reserved < 0:
                problems.append(f"I9: {where} has a negative total")
        for scope, key in expected:
            problems.append(f"I10: holds were taken on {scope} window {key} with no counter")
        checks = {
            "I4: {} holds carry a charge or late mark without being settled": (
                "SELECT count(*) FROM holds WHERE state != 'settled' AND (charged != 0 OR late)"
            ),
            "I4: {} settled holds record a wrong overrun": (
                "SELECT count(*) FROM holds WHERE state = 'settled' AND overrun != "
                "max(0, charged - amount)"
            ),
            "I6: {} holds expired before their TTL": (
                "SELECT count(*) FROM holds WHERE state = 'expired' AND "
                "(ended_at IS NULL OR ended_at < expires_at)"
            ),
            "I8: {} holds do not cover exactly their scopes": (
                "SELECT count(*) FROM holds h WHERE (SELECT count(*) FROM hold_scopes s "
                "WHERE s.hold_id = h.hold_id) != (CASE WHEN h.scopes = '' THEN 0 ELSE "
                "length(h.scopes) - length(replace(h.scopes, ' ', '')) + 1 END)"
            ),
            "I11: {} money values are not integers": (
                "SELECT (SELECT count(*) FROM counters WHERE typeof(spent) != 'integer' "
                "OR typeof(reserved) != 'integer') + (SELECT count(*) FROM holds WHERE "
                "typeof(amount) != 'integer' OR typeof(charged) != 'integer')"
            ),
            # Yesterday and today (UTC) only: cheap on a ledger of millions of records.
            "rollup: {} (day, user, key, model) sums in usage_daily differ from their records": (
                "SELECT count(*) FROM (SELECT * FROM (SELECT "
                f"{DAY_SQL}, user, key_id, model, {ROLLUP_AGGREGATES} FROM usage_records "
                f"WHERE seq <= (SELECT seq FROM usage_rollup) AND created_at >= {since_us} "
                f"GROUP BY 1, 2, 3, 4 EXCEPT SELECT {_DAILY_COLUMNS} FROM usage_daily "
                f"WHERE day >= {since_day}) UNION ALL "
                f"SELECT * FROM (SELECT {_DAILY_COLUMNS} FROM usage_daily "
                f"WHERE day >= {since_day} EXCEPT SELECT "
                f"{DAY_SQL}, user, key_id, model, {ROLLUP_AGGREGATES} FROM usage_records "
                f"WHERE seq <= (SELECT seq FROM usage_rollup) AND created_at >= {since_us} "
                "GROUP BY 1, 2, 3, 4))"
            ),
        }
        for message, sql in checks.items():
            count = c.execute(sql).fetchone()[0]
            if count:
                problems.append(message.format(count))
        return problems

    # -- usage and keys ----------------------------------------------------------------
    @staticmethod
    def _usage_where(query: UsageFilter, *bounds: tuple[str, int | None]) -> tuple[str, list[Any]]:
        """The WHERE clause of ``query``'s filters; time bounds as ``bounds`` if given."""
        if not bounds:
            bounds = (
                ("created_at >= ?", None if query.since is None else _dt_us(query.since)),
                ("created_at < ?", None if query.until is None else _dt_us(query.until)),
            )
        terms: list[str] = []
        args: list[Any] = []
        for term, value in (
            *bounds,
            ("user = ?", query.user),
            ("key_id = ?", query.key),
            ("model = ?", query.model),
        ):
            if value is not None:
                terms.append(term)
                args.append(value)
        return ("WHERE " + " AND ".join(terms) + " " if terms else ""), args

    def _usage_parts(self, query: UsageFilter) -> tuple[list[str], list[Any]]:
        """SELECTs of usage_daily rows whose sums are the totals of ``query``'s records.

        Whole days come from usage_daily plus the records past its watermark; the
        partial days at the range's edges from the records.
        """
        days = whole_days(query)
        since = None if query.since is None else _dt_us(query.since)
        until = None if query.until is None else _dt_us(query.until)
        if days is None:
            where, args = self._usage_where(query)
            return [f"SELECT {_RECORD_AS_DAILY} FROM usage_records {where}"], args
        first = None if days[0] is None else (days[0] - _EPOCH_DAY).days
        end = None if days[1] is None else (days[1] - _EPOCH_DAY).days
        first_us = None if first is None else first * _DAY_US
        end_us = None if end is None else end * _DAY_US
        (mark,) = self.c.execute("SELECT seq FROM usage_rollup").fetchone()
        records = f"SELECT {_RECORD_AS_DAILY} FROM usage_records"
        parts: list[tuple[str, tuple[tuple[str, int | None], ...]]] = [
            (f"SELECT {_DAILY_COLUMNS} FROM usage_daily", (("day >= ?", first), ("day < ?", end))),
            (
                records,
                (("seq > ?", mark), ("created_at >= ?", first_us), ("created_at < ?", end_us)),
            ),
        ]
        if since is not None and first_us is not None and since < first_us:
            parts.append((records, (("created_at >= ?", since), ("created_at < ?", first_us))))
        if until is not None and end_us is not None and end_us < until:
            parts.append((records, (("created_at >= ?", end_us), ("created_at < ?", until))))
        selects: list[str] = []
        args = []
        for select, bounds in parts:
            where, part_args = self._usage_where(query, *bounds)
            selects.append(select + " " + where)
            args.extend(part_args)
        return selects, args

    def usage(self, now: int, query: UsageFilter, limit: int) -> list[UsageRecord]:
        self.flush()
        where, args = self._usage_where(query)
        rows = self.c.execute(
            f"SELECT {_USAGE_COLUMNS} FROM usage_records {where}"
            "ORDER BY created_at DESC, seq DESC LIMIT ?",
            (*args, limit),
        ).fetchall()
        return [
            UsageRecord(
                request_id=r[0],
                key_id=r[1],
                user=r[2],
                model=r[3],
                endpoint=r[4],
                status=r[5],
                usage_source=r[6],
                input_tokens=r[7],
                output_tokens=r[8],
                cache_read_tokens=r[9],
                cache_write_tokens=r[10],
                cost=from_nanos(r[11]),
                error=r[12],
                latency_ms=r[13],
                created_at=_dt(r[14]),
            )
            for r in rows
        ]

    def usage_totals(
        self, now: int, groups: tuple[UsageGroup, ...], query: UsageFilter
    ) -> list[UsageTotal]:
        self.flush()
        parts, args = self._usage_parts(query)
        columns = [_USAGE_GROUP_SQL[g] for g in groups]
        select = ", ".join([*columns, _USAGE_SUMS_AS])
        group = f" GROUP BY {', '.join(columns)}" if columns else ""
        # Each part is summed on its own first, so the union carries few rows per group.
        union = " UNION ALL ".join(f"SELECT {select} FROM ({part}){group}" for part in parts)
        rows = self.c.execute(
            f"SELECT {', '.join([*columns, _USAGE_SUMS])} FROM ({union}){group}", args
        ).fetchall()
        n = len(groups)
        return sort_totals(
            [
                UsageTotal(
                    group=tuple(
                        _EPOCH_DAY + timedelta(days=v) if g == "day" else v
                        for g, v in zip(groups, r[:n], strict=True)
                    ),
                    requests=r[n],
                    input_tokens=r[n + 1],
                    output_tokens=r[n + 2],
                    cache_read_tokens=r[n + 3],
                    cache_write_tokens=r[n + 4],
                    cost=from_nanos(r[n + 5]),
                )
                for r in rows
                if r[n]  # an aggregate without GROUP BY answers one row even for no records
            ]
        )

    @staticmethod
    def _key(r: tuple[Any, ...]) -> ApiKeyRecord:
        return ApiKeyRecord(
            key_id=r[0],
            key_hash=r[1],
            prefix=r[2],
            user=r[3],
            team=r[4],
            revoked=bool(r[5]),
            created_at=_dt(r[6]),
            expires_at=None if r[7] is None else _dt(r[7]),
            allowed_models=None if r[8] is None else tuple(json.loads(r[8])),
            rpm=r[9],
            max_concurrent=r[10],
            tpm=r[11],
        )

    def create_key(self, now: int, record: ApiKeyRecord) -> ApiKeyRecord:
        self.flush()
        created = now if record.created_at is None else _dt_us(record.created_at)
        try:
            self.c.execute(
                f"INSERT INTO api_keys ({_KEY_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.key_id,
                    record.key_hash,
                    record.prefix,
                    record.user,
                    record.team,
                    int(record.revoked),
                    created,
                    None if record.expires_at is None else _dt_us(record.expires_at),
                    None if record.allowed_models is None else json.dumps(record.allowed_models),
                    record.rpm,
                    record.max_concurrent,
                    record.tpm,
                ),
            )
        except sqlite3.IntegrityError:
            raise ConfigurationError(
                f"API key {record.key_id!r} already exists (same id or same key hash)"
            ) from None
        self.key_changed()
        return dataclasses.replace(record, created_at=_dt(created))

    def find_key(self, now: int, key_hash: str) -> ApiKeyRecord | None:
        self.flush()
        row = self.c.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,)
        ).fetchone()
        return None if row is None else self._key(row)

    def revoke_key(self, now: int, key_id: str) -> bool:
        self.flush()
        cursor = self.c.execute("UPDATE api_keys SET revoked = 1 WHERE key_id = ?", (key_id,))
        if cursor.rowcount == 0:
            return False
        self.key_changed()
        return True

    def update_key(
        self, now: int, key_id: str, changes: dict[str, int | None]
    ) -> ApiKeyRecord | None:
        self.flush()
        assignments = ", ".join(f"{name} = ?" for name in changes)  # names validated
        cursor = self.c.execute(
            f"UPDATE api_keys SET {assignments} WHERE key_id = ?",
            (*changes.values(), key_id),
        )
        if cursor.rowcount == 0:
            return None
        self.key_changed()
        row = self.c.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        return self._key(row)

    def key_changed(self) -> None:
        """Tell every connection (via the stored epoch) and this ledger that a key changed."""
        self.c.execute("UPDATE key_epoch SET epoch = epoch + 1")
        self.keys_changed = True

    def stored_key_epoch(self) -> int:
        row = self.c.execute("SELECT epoch FROM key_epoch").fetchone()
        return 0 if row is None else int(row[0])

    def list_keys(self, now: int, user: str | None) -> list[ApiKeyRecord]:
        self.flush()
        where = "WHERE user = ? " if user is not None else ""
        rows = self.c.execute(
            f"SELECT {_KEY_COLUMNS} FROM api_keys {where}ORDER BY seq",
            (user,) if user is not None else (),
        ).fetchall()
        return [self._key(r) for r in rows]

    # -- response contexts ---------------------------------------------------------------
    # Written straight into the batch's transaction (not through the flush): a rollback
    # of the batch or of the operation's savepoint undoes them with everything else.
    def settle_remembering(
        self, now: int, hold_id: str, actual: int, record: UsageRecord, cost: int
    ) -> Hold:
        """``settle``; if it charged the hold (not a replay), remember the record's context."""
        before = self.get(hold_id)
        hold = self.settle(now, hold_id, actual, record, cost)
        context = record.response_context
        if context is not None and before is not None and before[3] in ("held", "expired"):
            self.remember(context, now)
        return hold

    def remember(self, context: ResponseContext, now: int) -> None:
        expires = now + max(1, _us(context.ttl))
        for context_id in context.ids:
            self.c.execute(
                _CONTEXT_UPSERT,
                (context_id, context.owner, context.tokens, now, expires, context.growth),
            )

    def response_context(self, now: int, context_id: str, owner: str) -> int | None:
        row = self.c.execute(
            "SELECT tokens FROM response_contexts "
            "WHERE context_id = ? AND owner = ? AND expires_at > ?",
            (context_id, owner, now),
        ).fetchone()
        return None if row is None else int(row[0])

    def prune_contexts(self, now: int, limit: int) -> int:
        """Delete up to ``limit`` expired response contexts; return how many."""
        cursor = self.c.execute(
            "DELETE FROM response_contexts WHERE (context_id, owner) IN (SELECT context_id, "
            "owner FROM response_contexts WHERE expires_at <= ? LIMIT ?)",
            (now, limit),
        )
        return cursor.rowcount

    def sweep_and_prune(self, now: int) -> int:
        """``sweep``, then prune a batch of expired response contexts and the refusal
        counts past their retention; return the holds."""
        swept = self.sweep(now)
        self.prune_contexts(now, _PRUNE_BATCH)
        self.c.execute("DELETE FROM denials WHERE hour < ?", (now - _us(DENIAL_RETENTION),))
        return swept

    def add_denials(self, now: int, rows: list[tuple[int, str, int]]) -> None:
        self.c.executemany(_DENIALS_UPSERT, rows)

    def denials(self, now: int, since: int, until: int | None) -> list[DenialCount]:
        sql, args = "SELECT hour, reason, count FROM denials WHERE hour >= ?", [since]
        if until is not None:
            sql, args = sql + " AND hour < ?", [since, until]
        rows = self.c.execute(sql + " ORDER BY hour, reason", args).fetchall()
        return [DenialCount(_dt(hour), reason, count) for hour, reason, count in rows]


_Op = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]", asyncio.AbstractEventLoop]


#: Errors of the store rather than of one operation (locked, I/O, disk full): they fail
#: the whole batch as unavailable. Every other exception belongs to the operation that
#: raised it and is isolated to it.
_STORE_FAILURES = (sqlite3.OperationalError, sqlite3.InternalError)


def _refusal(exc: Exception) -> GatewayKitError:
    """What the caller of an operation that raised ``exc`` (and was undone) receives."""
    if isinstance(exc, GatewayKitError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        error = LedgerError(f"the ledger refused a write breaking an invariant: {exc}")
    else:
        logger.warning("SQLite ledger operation failed; undone alone", exc_info=exc)
        error = LedgerError(f"the ledger could not store this operation: {exc!r}")
    error.__cause__ = exc
    return error


def _deliver(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():
            continue  # the caller was cancelled; the outcome stands in the store
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _Writer(threading.Thread):
    """Owns the connection; runs queued operations in group-committed batches.

    Operations submitted in one event-loop iteration travel together: :meth:`submit`
    collects them per loop and one ``call_soon`` callback puts the whole list on the
    queue, so a batch costs one cross-thread wake-up of the writer, not one per
    operation (and the writer, woken by the first, does not start on a batch of one
    while the loop is still submitting the rest). Results go back in one
    ``call_soon_threadsafe`` per batch and loop.
    """

    def __init__(self, ledger: SQLiteLedger, ready: asyncio.Future[None]) -> None:
        super().__init__(name=f"gatewaykit-sqlite-ledger:{ledger.path}", daemon=True)
        self.ledger = ledger
        self.queue: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self.ready = ready
        self.ready_loop = ready.get_loop()
        self.closed: asyncio.Future[None] | None = None
        #: Operations submitted in the current iteration of each loop, not yet queued.
        self.pending: dict[asyncio.AbstractEventLoop, list[_Op]] = {}
        #: Set (under ``lock``) once the writer takes no more work: later flushes fail.
        self.stopped = False
        self.lock = threading.Lock()

    def submit(self, op: _Op) -> None:
        """Queue ``op`` with the others of this loop iteration (called on ``op``'s loop)."""
        loop = op[3]
        pending = self.pending.get(loop)
        if pending is None:
            pending = self.pending[loop] = []
            loop.call_soon(self.flush, loop)
        pending.append(op)

    def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand this loop's pending operations to the writer as one queue item."""
        ops = self.pending.pop(loop, None)
        if not ops:
            return
        with self.lock:
            if not self.stopped:
                self.queue.put(ops)
                return
        _deliver(
            [(op[2], False, LedgerUnavailableError("the SQLite ledger is closed")) for op in ops]
        )

    def _connect(self) -> sqlite3.Connection:
        ledger = self.ledger
        where = "the in-memory ledger" if ledger.path == ":memory:" else f"ledger {ledger.path!r}"
        try:
            conn = sqlite3.connect(
                ledger.path,
                timeout=ledger.busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise LedgerUnavailableError(f"cannot open {where}: {exc}") from None
        try:
            prepare(conn, where)
            if ledger.path != ":memory:":
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise LedgerUnavailableError(f"{where} cannot use WAL (journal mode {mode})")
            conn.execute(f"PRAGMA synchronous = {ledger.synchronous}")
            conn.execute(f"PRAGMA busy_timeout = {int(ledger.busy_timeout * 1000)}")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise LedgerUnavailableError(f"cannot open {where}: {exc}") from None
            raise
        return conn

    def run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:
            self.ready_loop.call_soon_threadsafe(_set_exc, self.ready, exc)
            return
        self.ready_loop.call_soon_threadsafe(_set_ok, self.ready)
        store = _Store(conn)
        try:
            self._loop(conn, store)
        finally:
            conn.close()
            if self.closed is not None:
                self.closed.get_loop().call_soon_threadsafe(_set_ok, self.closed)

    def _loop(self, conn: sqlite3.Connection, store: _Store) -> None:
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        seen_epoch = store.stored_key_epoch()
        get, get_nowait = self.queue.get, self.queue.get_nowait
        stopping = False
        carry: list[_Op] = []  # taken from the queue, beyond the last batch's cap
        busy = False  # the last batch held more than one operation
        while True:
            if carry:
                batch, carry = carry, []
            elif stopping:
                break
            else:
                try:
                    first = get(timeout=_IDLE_POLL)
                except queue.Empty:  # idle: still notice other connections' key changes
                    try:
                        current = conn.execute("PRAGMA data_version").fetchone()[0]
                        if current != version:
                            store.forget()
                            version = current
                            seen_epoch = self._learn_key_epoch(store, seen_epoch)
                    except sqlite3.Error:
                        logger.debug("SQLite ledger idle check failed", exc_info=True)
                    continue
                if first is None:
                    break
                batch = first
            # Under load (the last batch held several operations) wait a moment for more
            # before committing: one fsync then covers more of them. A lone operation
            # (an idle gateway, c=1) never waits.
            linger = _LINGER if busy else 0.0
            while not stopping and len(batch) < _MAX_BATCH:
                try:
                    item = get(timeout=linger) if linger else get_nowait()
                except queue.Empty:
                    break
                linger = 0.0
                if item is None:
                    stopping = True
                    break
                batch.extend(item)
            busy = len(batch) > 1
            if len(batch) > _MAX_BATCH:
                batch, carry = batch[:_MAX_BATCH], batch[_MAX_BATCH:]
            batch = [op for op in batch if not op[2].cancelled()]  # cancelled before running
            if not batch:
                continue
            try:
                conn.execute("BEGIN IMMEDIATE")
                current = conn.execute("PRAGMA data_version").fetchone()[0]
            except sqlite3.Error as exc:
                self._rollback(conn, store)
                self._fail(batch, self.ledger._unavailable(exc))
                continue
            now = _us(self.ledger.clock())  # one instant per batch: it commits at once
            store.keys_changed = False
            try:
                if current != version:  # another connection committed: caches may be stale
                    store.forget()
                    version = current
                    seen_epoch = self._learn_key_epoch(store, seen_epoch)
                store.trim()
                store.prefetch([op[1][0] for op in batch if op[0] is _Store.reserve])
                results = self._run(store, batch, now, isolate=False)
                if results is None:  # an operation failed: redo the batch, each op isolated
                    self._rollback(conn, store)
                    conn.execute("BEGIN IMMEDIATE")
                    results = self._run(store, batch, now, isolate=True)
                    assert results is not None
                committed_epoch = store.stored_key_epoch() if store.keys_changed else None
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(conn, store)
                self._fail(batch, self.ledger._unavailable(exc))
                continue
            except BaseException as exc:  # a bug: never commit half an operation
                self._rollback(conn, store)
                logger.exception("SQLite ledger batch failed unexpectedly")
                self._fail(batch, LedgerError(f"internal ledger error: {exc!r}"))
                continue
            if committed_epoch is not None:  # before the callers hear of their change
                seen_epoch = committed_epoch
                self.ledger._key_epoch += 1
            self._resolve(results)
        with self.lock:
            self.stopped = True  # from now on, flushes fail their operations themselves
        while True:  # operations queued while closing
            try:
                item = get_nowait()
            except queue.Empty:
                break
            if item is not None:
                carry.extend(item)
        if carry:
            self._fail(carry, LedgerUnavailableError("the SQLite ledger is closed"))

    def _learn_key_epoch(self, store: _Store, seen: int) -> int:
        """After another connection committed: bump the ledger's key epoch if it changed keys."""
        stored = store.stored_key_epoch()
        if stored != seen:
            self.ledger._key_epoch += 1
        return stored

    @staticmethod
    def _run(
        store: _Store, batch: list[_Op], now: int, *, isolate: bool
    ) -> list[tuple[_Op, bool, Any]] | None:
        """Run a batch in the open transaction and write it out.

        Optimistically (``isolate=False``) operations run back to back and are flushed
        together; any exception returns None so the caller rolls back and redoes the batch
        with ``isolate=True``: each operation in its own SAVEPOINT, flushed on its own, an
        exception undoing only that operation.
        """
        results: list[tuple[_Op, bool, Any]] = []
        execute = store.c.execute
        for op in batch:
            fn, args, _, _ = op
            if isolate:
                execute("SAVEPOINT op")
            try:
                value = fn(store, now, *args)
                if isolate:
                    store.flush()
            except _STORE_FAILURES:
                raise  # the store itself failed: the whole batch fails
            except Exception as exc:
                if not isolate:
                    return None
                execute("ROLLBACK TO op")
                execute("RELEASE op")
                store.forget()
                results.append((op, False, _refusal(exc)))
                continue
            if isolate:
                execute("RELEASE op")
            if isinstance(value, _Fail):
                results.append((op, False, value.error))
            else:
                results.append((op, True, value))
        if not isolate:
            try:
                store.flush()
            except _STORE_FAILURES:
                raise
            except Exception:
                return None
        return results

    @staticmethod
    def _rollback(conn: sqlite3.Connection, store: _Store) -> None:
        store.forget()
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            logger.warning("SQLite ledger rollback failed", exc_info=True)

    @staticmethod
    def _resolve(results: list[tuple[_Op, bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for (_, _, future, loop), ok, value in results:
            by_loop.setdefault(loop, []).append((future, ok, value))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop closed: nobody waits
                loop.call_soon_threadsafe(_deliver, items)

    def _fail(self, batch: list[_Op], error: LedgerError) -> None:
        """Fail every operation of ``batch``, each with its own exception instance."""
        self._resolve([(op, False, type(error)(str(error))) for op in batch])


def _set_ok(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _set_exc(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class SQLiteLedger(AsyncResource):
    """The embedded ledger: one SQLite file (or ``:memory:``), WAL, durable by default.

    ``synchronous="FULL"`` (default) makes every acknowledged operation survive power
    loss; ``"NORMAL"`` may lose the last commits on power loss (never on a crash).
    ``clock`` is the store clock (seconds since the epoch; default :func:`time.time`):
    callers never pass time into operations. Use asyncio.
    """

    #: An operation whose caller is cancelled still runs to its end, or not at all, in
    #: submission order on the one writer: a release submitted after a cancelled reserve
    #: finds the hold, or leaves the tombstone that reserve then finds. Callers may await
    #: operations without shielding them (``StandaloneMode.cancel_safe``).
    cancel_safe = True

    def __init__(
        self,
        path: str,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        clock: Callable[[], float] | None = None,
        busy_timeout: float = 5.0,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise ConfigurationError(f"SQLiteLedger needs a file path or ':memory:', got {path!r}")
        if synchronous not in ("FULL", "NORMAL"):
            raise ConfigurationError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        if (
            isinstance(busy_timeout, bool)
            or not isinstance(busy_timeout, (int, float))
            or (busy_timeout < 0)
        ):
            raise ConfigurationError(f"busy_timeout must be seconds ≥ 0, got {busy_timeout!r}")
        self.path = path
        self.synchronous = synchronous
        self.clock: Callable[[], float] = clock or time.time
        self.busy_timeout = float(busy_timeout)
        self._writer: _Writer | None = None
        self._key_epoch = 0  # written by the writer thread only

    def __repr__(self) -> str:
        return f"SQLiteLedger({self.path!r}, synchronous={self.synchronous!r})"

    @property
    def key_epoch(self) -> int:
        """Increases whenever this ledger learns that an API key changed.

        Its own ``create_key``/``revoke_key`` count before they return; another
        connection's (the CLI, another process) as soon as the writer notices its commit:
        at the start of the next batch, or within ``_IDLE_POLL`` (0.5 s) when idle.
        ``StandaloneMode`` drops cached key lookups taken under an older epoch.
        """
        return self._key_epoch

    def _unavailable(self, exc: sqlite3.Error) -> LedgerUnavailableError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            hint = f"locked by another connection for longer than busy_timeout={self.busy_timeout}s"
        else:
            hint = text
        return LedgerUnavailableError(f"the SQLite ledger {self.path!r} is unavailable: {hint}")

    # -- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        if self._writer is not None:
            return
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        writer = _Writer(self, ready)
        writer.start()
        try:
            await ready
        except BaseException:
            writer.join()
            raise
        self._writer = writer

    async def aclose(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        loop = asyncio.get_running_loop()
        writer.flush(loop)  # operations submitted just before, ahead of the stop mark
        writer.closed = loop.create_future()
        writer.queue.put(None)
        await asyncio.shield(writer.closed)

    async def _call(self, fn: Callable[..., T | _Fail], *args: Any) -> T:
        writer = self._writer
        if writer is None:
            raise LedgerUnavailableError(
                "the SQLite ledger is not open; use 'async with ledger' or 'await ledger.open()'"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        writer.submit((fn, args, future, loop))
        return await future

    # -- budgets -----------------------------------------------------------------------
    async def set_budget(
        self, scope: str, *, limit: Decimal | None, period: Period = _NO_PERIOD
    ) -> BudgetStatus:
        (scope,) = validate_scopes([scope])
        if not isinstance(period, Period):
            period = Period.parse(period)
        nanos = None if limit is None else to_nanos(limit)
        return await self._call(_Store.set_budget, scope, nanos, period)

    async def delete_budget(self, scope: str) -> bool:
        (scope,) = validate_scopes([scope])
        return await self._call(_Store.delete_budget, scope)

    async def status(self, scope: str) -> BudgetStatus | None:
        (scope,) = validate_scopes([scope])
        return await self._call(_Store.get_status, scope)

    async def budgets(self) -> list[BudgetStatus]:
        return await self._call(_Store.all_budgets)

    # -- holds -------------------------------------------------------------------------
    async def reserve(
        self,
        hold_id: str,
        scopes: Sequence[str],
        amount: Decimal,
        *,
        ttl: float,
        fit: OutputFit | None = None,
        max_live: Mapping[str, int] | None = None,
    ) -> Hold:
        hold_id = validate_hold_id(hold_id)
        scope_t = validate_scopes(scopes)
        nanos = _nanos(amount)
        ttl_us = max(1, _us(validate_ttl(ttl)))
        if fit is not None or max_live:
            fit = validate_fit(fit, nanos)
            caps = validate_max_live(max_live, scope_t)
            return await self._call(_Store.reserve, hold_id, scope_t, nanos, ttl_us, fit, caps)
        return await self._call(_Store.reserve, hold_id, scope_t, nanos, ttl_us)

    async def settle(
        self, hold_id: str, actual: Decimal, *, record: UsageRecord | None = None
    ) -> Hold:
        hold_id = validate_hold_id(hold_id)
        nanos = _nanos(actual)
        cost = _record_cost(record)
        if record is not None and record.response_context is not None:
            return await self._call(_Store.settle_remembering, hold_id, nanos, record, cost)
        return await self._call(_Store.settle, hold_id, nanos, record, cost)

    async def release(self, hold_id: str, *, record: UsageRecord | None = None) -> Hold:
        hold_id = validate_hold_id(hold_id)
        return await self._call(_Store.release, hold_id, record, _record_cost(record))

    async def extend(self, hold_id: str, *, ttl: float) -> Hold:
        hold_id = validate_hold_id(hold_id)
        ttl_us = max(1, _us(validate_ttl(ttl)))
        return await self._call(_Store.extend, hold_id, ttl_us)

    async def get_hold(self, hold_id: str) -> Hold | None:
        return await self._call(_Store.get_hold, validate_hold_id(hold_id))

    async def holds(self, *, live_only: bool = True, limit: int = 1000) -> list[Hold]:
        return await self._call(_Store.list_holds, bool(live_only), validate_limit(limit))

    async def sweep(self) -> int:
        """Expire due holds (their count is returned), prune expired response contexts,
        and fold the usage records written since the last sweep into the daily rollup
        (in steps, so other operations run in between)."""
        swept: int = await self._call(_Store.sweep_and_prune)
        while await self._call(_Store.rollup, _ROLLUP_BATCH) == _ROLLUP_BATCH:
            pass
        return swept

    async def check(self) -> list[str]:
        return await self._call(_Store.check)

    # -- usage records -----------------------------------------------------------------
    async def usage(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        key: str | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> list[UsageRecord]:
        query = validate_usage_filter(since, until, user, key, model)
        return await self._call(_Store.usage, query, validate_limit(limit))

    async def usage_totals(
        self,
        *,
        group_by: Sequence[UsageGroup],
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        key: str | None = None,
        model: str | None = None,
    ) -> list[UsageTotal]:
        groups = validate_usage_groups(group_by)
        query = validate_usage_filter(since, until, user, key, model)
        return await self._call(_Store.usage_totals, groups, query)

    async def response_context(self, context_id: str, owner: str) -> int | None:
        context_id = validate_context_id(context_id)
        (owner,) = validate_scopes([owner])
        return await self._call(_Store.response_context, context_id, owner)

    # -- refusals ----------------------------------------------------------------------
    async def add_denials(self, counts: Mapping[tuple[datetime, str], int]) -> None:
        rows = [(_dt_us(hour), reason, n) for hour, reason, n in validate_denials(counts)]
        if rows:
            await self._call(_Store.add_denials, rows)

    async def denials(self, *, since: datetime, until: datetime | None = None) -> list[DenialCount]:
        query = validate_denial_range(since, until)
        end = None if query.until is None else _dt_us(query.until)
        return await self._call(_Store.denials, _dt_us(since), end)

    # -- API keys ------------------------------------------------------------------------
    async def create_key(self, record: ApiKeyRecord) -> ApiKeyRecord:
        if not isinstance(record, ApiKeyRecord):
            raise ConfigurationError("create_key needs an ApiKeyRecord")
        return await self._call(_Store.create_key, record)

    async def find_key(self, key_hash: str) -> ApiKeyRecord | None:
        return await self._call(_Store.find_key, key_hash)

    async def revoke_key(self, key_id: str) -> bool:
        return await self._call(_Store.revoke_key, key_id)

    async def update_key(self, key_id: str, **limits: int | None) -> ApiKeyRecord | None:
        return await self._call(_Store.update_key, key_id, validate_key_limits(limits))

    async def list_keys(self, *, user: str | None = None) -> list[ApiKeyRecord]:
        return await self._call(_Store.list_keys, user)


def _record_cost(record: UsageRecord | None) -> int:
    """Validate a usage record before it is queued; return its cost in nano-USD."""
    record = validate_record(record)
    return 0 if record is None else to_nanos(record.cost)
