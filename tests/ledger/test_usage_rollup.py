"""The daily usage rollup (schema version 7): ``usage_totals`` always equals summing the
records ``usage`` lists, whatever the sweeps have folded into the rollup so far.

Every conformance test runs on every registered backend (the model has no rollup: it is
the reference). Records are written at arbitrary store times, so a record can land, after
a sweep, on a day the rollup already covers — as a settle committed late does.
"""

from __future__ import annotations

import secrets
import sqlite3
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatewaykit.ledger.base import (
    USAGE_GROUPS,
    Ledger,
    UsageGroup,
    UsageRecord,
    UsageTotal,
    validate_usage_filter,
)
from tests.ledger.backends import START, Backend, FakeClock
from tests.ledger.model import total_usage

pytestmark = pytest.mark.anyio

UTC = timezone.utc
DAY0 = datetime.fromtimestamp(START, UTC).replace(hour=0)  # 2026-01-15 00:00 UTC
USERS = ("alice", "bob", "", None)  # "" and None are different users
KEYS = ("k1", "k2", None)
MODELS = ("gpt-4o", "claude")


async def put(
    ledger: Ledger,
    clock: FakeClock,
    request_id: str,
    at: datetime,
    *,
    user: str | None = "alice",
    key: str | None = "k1",
    model: str = "gpt-4o",
    nanos: int = 250,
) -> None:
    """Write one usage record at store time ``at`` (by a settle, or a release when free)."""
    clock.t = at.timestamp()  # any order: a late record may carry an old time
    record = UsageRecord(
        request_id,
        model,
        "/v1/chat/completions",
        "success",
        "provider",
        key_id=key,
        user=user,
        input_tokens=nanos % 97,
        output_tokens=nanos % 13,
        cache_read_tokens=nanos % 5,
        cost=Decimal(nanos).scaleb(-9),
    )
    await ledger.reserve(request_id, ["user:x"], Decimal(1), ttl=3600)
    if nanos:
        await ledger.settle(request_id, record.cost, record=record)
    else:
        await ledger.release(request_id, record=record)


async def brute(ledger: Ledger, groups: tuple[UsageGroup, ...], **query: Any) -> list[UsageTotal]:
    """``usage_totals`` the slow way: every matching record, summed in Python."""
    records = await ledger.usage(limit=1_000_000)
    keys = ("since", "until", "user", "key", "model")
    return total_usage(records, groups, validate_usage_filter(*(query.get(k) for k in keys)))


async def assert_exact(ledger: Ledger, groups: tuple[UsageGroup, ...], **query: Any) -> None:
    assert await ledger.usage_totals(group_by=groups, **query) == await brute(
        ledger, groups, **query
    ), (groups, query)


# A range's edges: midnights, and instants inside a day, before and after the records.
EDGES = [DAY0 + timedelta(hours=h) for h in (-24, 0, 7, 24, 30, 48, 72, 95)]
QUERIES: list[dict[str, Any]] = [
    {},
    {"since": DAY0},
    {"until": DAY0 + timedelta(days=2)},
    {"since": DAY0 + timedelta(hours=7), "until": DAY0 + timedelta(hours=30)},
    {"since": DAY0 + timedelta(hours=7), "until": DAY0 + timedelta(hours=95)},
    {"since": DAY0 + timedelta(hours=30)},
    {"since": DAY0 + timedelta(hours=1), "until": DAY0 + timedelta(hours=2)},
    {"since": DAY0, "until": DAY0 + timedelta(days=1)},
    {"since": DAY0 + timedelta(hours=7), "user": "alice"},
    {"until": DAY0 + timedelta(hours=50), "key": None, "user": ""},
    {"since": DAY0 - timedelta(hours=1), "model": "claude", "key": "k2"},
    # Bounds in another zone: 01:00 at +01:00 is midnight UTC.
    {"since": (DAY0 + timedelta(days=1)).astimezone(timezone(timedelta(hours=1)))},
]
GROUPINGS: list[tuple[UsageGroup, ...]] = [(), ("day",), ("day", "model"), ("user", "key")]


async def test_totals_equal_the_records_around_the_watermark(
    ledger: Ledger, clock: FakeClock
) -> None:
    # Three days of records, folded into the rollup by a sweep.
    n = 0
    for day in range(3):
        for hour in (0, 5, 12, 23):
            user, key = USERS[n % 4], KEYS[n % 3]
            at = DAY0 + timedelta(days=day, hours=hour)
            await put(ledger, clock, f"a{n}", at, user=user, key=key, model=MODELS[n % 2])
            n += 1
    await ledger.sweep()
    # More after the watermark: on days the rollup covers (a late record), on a new day,
    # at a midnight, and free (cost 0).
    for i, hours in enumerate((5, 24, 47.5, 72, 1, 0)):
        at = DAY0 + timedelta(hours=hours)
        await put(ledger, clock, f"b{i}", at, user=USERS[i % 4], nanos=i * 1_000_000_001)
    for sweep in (False, True):
        for query in QUERIES:
            for groups in GROUPINGS:
                await assert_exact(ledger, groups, **query)
        if not sweep:
            await ledger.sweep()  # everything folded: the same answers from the rollup
    assert await ledger.check() == []


async def test_a_record_at_the_last_instant_of_a_day_stays_on_that_day(
    ledger: Ledger, clock: FakeClock
) -> None:
    end = DAY0 + timedelta(days=1)
    await put(ledger, clock, "r1", end - timedelta(microseconds=1))
    await put(ledger, clock, "r2", end)
    await ledger.sweep()
    queries: list[dict[str, Any]] = [{"until": end}, {"since": end}, {"since": DAY0, "until": end}]
    for query in queries:
        (total,) = await ledger.usage_totals(group_by=("day",), **query)
        assert total.requests == 1
        await assert_exact(ledger, ("day",), **query)


async def test_sweep_folds_a_backlog_larger_than_one_step(
    ledger: Ledger, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gatewaykit.ledger import postgres, sqlite

    monkeypatch.setattr(sqlite, "_ROLLUP_BATCH", 2)
    monkeypatch.setattr(postgres, "_ROLLUP_BATCH", 2, raising=False)
    for i in range(7):
        await put(ledger, clock, f"r{i}", DAY0 + timedelta(hours=i * 5), user=USERS[i % 4])
    await ledger.sweep()
    assert await ledger.check() == []
    for groups in GROUPINGS:
        await assert_exact(ledger, groups, since=DAY0 + timedelta(days=1))


_WRITE = st.tuples(
    st.integers(0, 3 * 24 * 60),  # minute of the three days
    st.integers(0, 3),
    st.integers(0, 2),
    st.integers(0, 1),
    st.sampled_from((0, 1, 10**9, 2**40)),  # nano-USD
)
_OPS = st.lists(st.one_of(st.just("sweep"), _WRITE), min_size=1, max_size=20)
_MOMENT = st.one_of(
    st.none(),
    st.integers(-24 * 60, 4 * 24 * 60).map(lambda m: DAY0 + timedelta(minutes=m)),
)
_QUERY = st.tuples(
    _MOMENT,
    _MOMENT,
    st.sampled_from((None, *USERS[:3])),
    st.sampled_from(KEYS),
    st.sampled_from((None, *MODELS)),
    st.lists(st.sampled_from(USAGE_GROUPS), unique=True, max_size=4),
)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_OPS, queries=st.lists(_QUERY, min_size=1, max_size=6))
async def test_totals_equal_the_records_for_any_writes_sweeps_and_query(
    backend: Backend, tmp_path: Path, ops: list[Any], queries: list[Any]
) -> None:
    clock = FakeClock()
    store = tmp_path / secrets.token_hex(4)  # a fresh store per example
    store.mkdir()
    async with backend.make(clock, store) as opener, opener() as ledger:
        for n, op in enumerate(ops):
            if op == "sweep":
                await ledger.sweep()
                continue
            minute, user, key, model, nanos = op
            at = DAY0 + timedelta(minutes=minute)
            await put(
                ledger,
                clock,
                f"r{n}",
                at,
                user=USERS[user],
                key=KEYS[key],
                model=MODELS[model],
                nanos=nanos,
            )
        for since, until, user, key, model, groups in queries:
            if since is not None and until is not None and since > until:
                since, until = until, since
            query = {"since": since, "until": until, "user": user, "model": model}
            if key is not None:
                query["key"] = key
            await assert_exact(ledger, tuple(groups), **query)
        assert await ledger.check() == []


# -- a database written before the rollup ------------------------------------------------


def _v6_records() -> list[tuple[Any, ...]]:
    """(request id, user, key, model, created_at) of the records in a version-6 store."""
    return [
        (f"old{i}", USERS[i % 4], KEYS[i % 3], MODELS[i % 2], DAY0 + timedelta(hours=7 * i))
        for i in range(12)
    ]


async def _check_migrated(ledger: Ledger, clock: FakeClock) -> None:
    assert await ledger.check() == []  # the rollup holds every old record, exactly
    assert len(await ledger.usage(limit=100)) == 12
    await put(ledger, clock, "new1", DAY0 + timedelta(hours=30))  # past the watermark
    for query in QUERIES:
        for groups in GROUPINGS:
            await assert_exact(ledger, groups, **query)
    await ledger.sweep()
    assert await ledger.check() == []


async def test_a_version_6_sqlite_file_gets_its_records_rolled_up(tmp_path: Path) -> None:
    from gatewaykit.ledger._sqlite_schema import APPLICATION_ID, LATEST_VERSION, MIGRATIONS
    from gatewaykit.ledger.sqlite import SQLiteLedger

    path = tmp_path / "v6.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for version in range(1, 7):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO gatewaykit_schema (version) VALUES (6)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    for request_id, user, key, model, at in _v6_records():
        conn.execute(
            "INSERT INTO usage_records (request_id, key_id, user, model, endpoint, status, "
            "usage_source, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, "
            "cost_nanos, created_at) VALUES (?, ?, ?, ?, 'chat', 'success', 'provider', 3, 4, "
            "5, 6, 7, ?)",
            (request_id, key, user, model, round(at.timestamp() * 1_000_000)),
        )
    conn.close()
    clock = FakeClock()
    async with SQLiteLedger(str(path), clock=clock) as ledger:
        await _check_migrated(ledger, clock)
    conn = sqlite3.connect(path)
    versions = conn.execute("SELECT version FROM gatewaykit_schema").fetchall()
    assert versions == [(LATEST_VERSION,)]
    conn.close()


@pytest.mark.postgres
async def test_a_version_6_postgres_schema_gets_its_records_rolled_up() -> None:
    import asyncpg

    from gatewaykit.ledger._postgres_schema import MIGRATIONS
    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    async with fresh_schema("gk_v6") as schema:
        admin: Any = await asyncpg.connect(DSN)
        try:
            await admin.execute(f'SET search_path TO "{schema}"')
            for version in range(1, 7):
                await admin.execute(MIGRATIONS[version - 1])
                await admin.execute("INSERT INTO gatewaykit_schema (version) VALUES ($1)", version)
            await admin.executemany(
                "INSERT INTO usage_records (request_id, key_id, user_id, model, endpoint, "
                "status, usage_source, input_tokens, output_tokens, cache_read_tokens, "
                "cache_write_tokens, cost_nanos, created_at) VALUES ($1, $3, $2, $4, 'chat', "
                "'success', 'provider', 3, 4, 5, 6, 7, $5)",
                _v6_records(),
            )
        finally:
            await admin.close()
        clock = FakeClock()
        async with PostgresLedger(DSN, schema=schema, clock=clock) as ledger:
            await _check_migrated(ledger, clock)


# -- PostgreSQL: records whose transaction commits after the rollup ran -----------------


@pytest.mark.postgres
async def test_a_record_committed_late_is_never_lost_from_the_totals() -> None:
    """A record drew its seq but its transaction is still open while a later record
    commits and a sweep runs: the rollup must not move its watermark past it."""
    import asyncpg

    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    insert = (
        "INSERT INTO usage_records (request_id, model, endpoint, status, usage_source, "
        "input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos, "
        "created_at) VALUES ($1, 'm', 'chat', 'success', 'provider', 1, 2, 3, 4, 5, $2)"
    )
    async with fresh_schema("gk_late") as schema:
        clock = FakeClock()
        async with PostgresLedger(DSN, schema=schema, clock=clock) as ledger:
            slow: Any = await asyncpg.connect(DSN, server_settings={"search_path": schema})
            try:
                late = slow.transaction()
                await late.start()
                await slow.execute(insert, "late", DAY0)  # draws the lower seq
                await put(ledger, clock, "early", DAY0 + timedelta(hours=1))  # commits first
                await ledger.sweep()  # waits for the open writer, gives up: no rollup
                await late.commit()
            finally:
                await slow.close()
            (total,) = await ledger.usage_totals(group_by=(), since=DAY0 - timedelta(days=1))
            assert total.requests == 2
            assert await ledger.check() == []
            await ledger.sweep()
            await assert_exact(ledger, ("day", "model"), since=DAY0 - timedelta(days=1))
            assert await ledger.check() == []


# -- check() looks at the recent rollup ----------------------------------------------------

_DIFFER = "sums in usage_daily differ from their records"


async def _two_days_apart(ledger: Ledger, clock: FakeClock) -> None:
    await put(ledger, clock, "old", DAY0 + timedelta(hours=1), user="alice")
    await put(ledger, clock, "new", DAY0 + timedelta(days=3, hours=1), user="bob")
    await ledger.sweep()  # both folded; the store clock is on day 3
    assert await ledger.check() == []


async def test_check_compares_yesterdays_and_todays_rollup_with_the_records(
    tmp_path: Path,
) -> None:
    """Only the recent days: a hand-edited old day goes unreported (it was compared when
    it was recent), today's is reported — so check() stays cheap on a large ledger."""
    from gatewaykit.ledger.sqlite import SQLiteLedger

    path = str(tmp_path / "ledger.db")
    clock = FakeClock()
    async with SQLiteLedger(path, clock=clock) as ledger:
        await _two_days_apart(ledger, clock)
    for user, reported in (("alice", False), ("bob", True)):
        with sqlite3.connect(path) as db:
            db.execute("UPDATE usage_daily SET requests = requests + 1 WHERE user = ?", (user,))
        async with SQLiteLedger(path, clock=clock) as ledger:
            problems = await ledger.check()
        assert any(_DIFFER in problem for problem in problems) is reported, problems


@pytest.mark.postgres
async def test_check_compares_yesterdays_and_todays_rollup_on_postgres() -> None:
    import asyncpg

    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    async with fresh_schema("gk_chk") as schema:
        clock = FakeClock()
        async with PostgresLedger(DSN, schema=schema, clock=clock) as ledger:
            await _two_days_apart(ledger, clock)
            for user, reported in (("alice", False), ("bob", True)):
                admin: Any = await asyncpg.connect(DSN)
                try:
                    await admin.execute(
                        f'UPDATE "{schema}".usage_daily SET requests = requests + 1 '
                        "WHERE user_id = $1",
                        user,
                    )
                finally:
                    await admin.close()
                problems = await ledger.check()
                assert any(_DIFFER in problem for problem in problems) is reported, problems
