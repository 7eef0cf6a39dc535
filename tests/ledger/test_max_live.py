"""Caps on live holds (``reserve(..., max_live=...)``): requests in flight per scope,
decided in the reserve itself. Every test runs on every backend in BACKENDS."""

from __future__ import annotations

import asyncio
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gatewaykit.errors import BudgetExceeded, ConcurrencyExceeded, ConfigurationError
from gatewaykit.ledger.base import ApiKeyRecord, Hold, Ledger, Period
from tests.ledger.backends import FakeClock

pytestmark = pytest.mark.anyio

D = Decimal
SCOPES = ["key:k", "user:a"]


async def test_cap_counts_live_holds_until_they_end(ledger: Ledger, clock: FakeClock) -> None:
    caps = {"key:k": 2}
    await ledger.reserve("r1", SCOPES, D(1), ttl=60, max_live=caps)
    await ledger.reserve("r2", ["key:k"], D(0), ttl=30, max_live=caps)  # a $0 hold counts too
    with pytest.raises(ConcurrencyExceeded) as refused:
        await ledger.reserve("r3", SCOPES, D(1), ttl=60, max_live=caps)
    assert (refused.value.scope, refused.value.limit, refused.value.live) == ("key:k", 2, 2)
    assert await ledger.get_hold("r3") is None
    await ledger.reserve("u1", ["user:a"], D(1), ttl=60, max_live={"user:a": 2})  # another scope
    await ledger.settle("r1", D("0.5"))
    await ledger.reserve("r3", SCOPES, D(1), ttl=60, max_live=caps)
    await ledger.release("r3")
    await ledger.reserve("r4", SCOPES, D(1), ttl=60, max_live=caps)
    clock.advance(30)  # r2 is due: the reserve reclaims it first
    await ledger.reserve("r5", SCOPES, D(1), ttl=60, max_live=caps)
    with pytest.raises(ConcurrencyExceeded):
        await ledger.reserve("r6", SCOPES, D(1), ttl=60, max_live=caps)
    # Without a cap the scope is not limited (the cap travels with the request).
    await ledger.reserve("r6", SCOPES, D(1), ttl=60)


async def test_a_cap_refuses_before_a_budget(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D(1))
    await ledger.reserve("r1", SCOPES, D(1), ttl=60, max_live={"key:k": 1})
    with pytest.raises(ConcurrencyExceeded):  # 429 before 402
        await ledger.reserve("r2", SCOPES, D(1), ttl=60, max_live={"key:k": 1})
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("r2", SCOPES, D(1), ttl=60, max_live={"key:k": 2})


async def test_holds_of_an_earlier_window_still_count(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget("key:k", limit=D(100), period=Period("rolling", 60))
    await ledger.reserve("r1", SCOPES, D(1), ttl=600, max_live={"key:k": 2})
    clock.advance(120)  # the budget's window moved on; r1 is still in flight
    await ledger.reserve("r2", SCOPES, D(1), ttl=600, max_live={"key:k": 2})
    with pytest.raises(ConcurrencyExceeded) as refused:
        await ledger.reserve("r3", SCOPES, D(1), ttl=600, max_live={"key:k": 2})
    assert refused.value.live == 2
    await ledger.settle("r1", D(1))
    await ledger.reserve("r3", SCOPES, D(1), ttl=600, max_live={"key:k": 2})


async def test_a_replay_is_not_refused_by_its_own_cap(ledger: Ledger) -> None:
    hold = await ledger.reserve("r1", SCOPES, D(1), ttl=60, max_live={"key:k": 1})
    assert await ledger.reserve("r1", SCOPES, D(1), ttl=60, max_live={"key:k": 1}) == hold


@pytest.mark.parametrize(
    "caps", [{"team:t": 1}, {"key:k": 0}, {"key:k": True}, {"key:k": 1.5}, {"key:k": 2**31}]
)
async def test_bad_caps(ledger: Ledger, caps: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        await ledger.reserve("r1", SCOPES, D(1), ttl=60, max_live=caps)  # type: ignore[arg-type]
    assert await ledger.get_hold("r1") is None


async def test_concurrent_reserves_admit_exactly_the_cap(ledger: Ledger) -> None:
    async def one(n: int) -> Hold | BaseException:
        try:
            return await ledger.reserve(f"r{n}", SCOPES, D(1), ttl=60, max_live={"key:k": 3})
        except ConcurrencyExceeded as exc:
            return exc

    results = await asyncio.gather(*(one(n) for n in range(10)))
    assert sum(isinstance(r, Hold) for r in results) == 3
    assert sum(isinstance(r, ConcurrencyExceeded) for r in results) == 7


async def test_keys_store_their_cap(ledger: Ledger) -> None:
    record = ApiKeyRecord(
        key_id="k1", key_hash="h" * 64, prefix="gk-abc", user="a", max_concurrent=3
    )
    await ledger.create_key(record)
    found = await ledger.find_key("h" * 64)
    assert found is not None
    assert found.max_concurrent == 3
    [listed] = await ledger.list_keys()
    assert listed.max_concurrent == 3


# -- schema version 5 on a database written before it --------------------------------------


async def test_a_version_3_sqlite_file_counts_its_live_holds(tmp_path: Path) -> None:
    """Migration 5 fills ``counters.live`` from the holds already in flight."""
    from gatewaykit.ledger._sqlite_schema import APPLICATION_ID, MIGRATIONS
    from gatewaykit.ledger.sqlite import SQLiteLedger

    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for version in (1, 2, 3):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO gatewaykit_schema (version) VALUES (3)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    # Two live holds and a settled one on key:k, as version 3 stored them.
    for hold_id, state in (("r1", "held"), ("r2", "held"), ("r3", "settled")):
        conn.execute(
            "INSERT INTO holds (hold_id, scopes, amount, state, created_at, expires_at, "
            "charged) VALUES (?, 'key:k', 5, ?, 0, ?, ?)",
            (hold_id, state, 2**60, 5 if state == "settled" else 0),
        )
        conn.execute("INSERT INTO hold_scopes VALUES (?, 'key:k', 0)", (hold_id,))
    conn.execute("INSERT INTO counters VALUES ('key:k', 0, 5, 10)")
    conn.close()
    async with SQLiteLedger(str(path)) as ledger:
        assert await ledger.check() == []
        await ledger.reserve("r4", ["key:k"], D(0), ttl=60, max_live={"key:k": 3})
        with pytest.raises(ConcurrencyExceeded):
            await ledger.reserve("r5", ["key:k"], D(0), ttl=60, max_live={"key:k": 3})


@pytest.mark.postgres
async def test_a_version_3_postgres_schema_counts_its_live_holds() -> None:
    import asyncpg

    from gatewaykit.ledger._postgres_schema import MIGRATIONS
    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    async with fresh_schema("gk_v3") as schema:
        admin: Any = await asyncpg.connect(DSN)
        try:
            await admin.execute(f'SET search_path TO "{schema}"')
            for version in (1, 2, 3):
                await admin.execute(MIGRATIONS[version - 1])
                await admin.execute("INSERT INTO gatewaykit_schema (version) VALUES ($1)", version)
            await admin.execute(
                "INSERT INTO holds (hold_id, scopes, windows, amount, state, created_at, "
                "expires_at) SELECT h, '{key:k}', '{1970-01-01 00:00:00+00}', 5, 'held', now(), "
                "now() + interval '1 hour' FROM unnest(ARRAY['r1', 'r2']) AS h"
            )
            await admin.execute(
                "INSERT INTO counters (scope, window_start, reserved, used) "
                "VALUES ('key:k', '1970-01-01 00:00:00+00', 10, true)"
            )
        finally:
            await admin.close()
        async with PostgresLedger(DSN, schema=schema) as ledger:
            assert await ledger.check() == []
            await ledger.reserve("r4", ["key:k"], D(0), ttl=60, max_live={"key:k": 3})
            with pytest.raises(ConcurrencyExceeded):
                await ledger.reserve("r5", ["key:k"], D(0), ttl=60, max_live={"key:k": 3})


# -- a count that drifted never stops money --------------------------------------------------
#
# ``counters.live`` only counts requests in flight. If it ever reads fewer holds than there
# are (an older gatewaykit, which does not count them, still writing to a migrated
# database), ending those holds must still charge and expire them: a settle or a sweep
# refused for a count would leave usage uncharged and every due hold in place.


async def _drift_then_end(ledger: Ledger, clock: FakeClock, drift: Any) -> None:
    await ledger.set_budget("user:a", limit=D(10))
    await ledger.reserve("h1", ["user:a"], D(1), ttl=60)
    await ledger.reserve("h2", ["user:a"], D(1), ttl=60)
    await ledger.reserve("h3", ["user:b"], D(1), ttl=60)
    ledger = await drift(ledger)  # user:a's live count now reads 0 instead of 2
    try:
        settled = await ledger.settle("h1", D("0.5"))
        assert settled.charged == D("0.5")
        clock.advance(61)
        assert await ledger.sweep() == 2  # h2 (its count already at 0) and h3
        assert await ledger.holds() == []
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.spent, status.held) == (D("0.5"), D(0))
        assert [p for p in await ledger.check() if "live holds" not in p] == []
    finally:
        await ledger.aclose()


async def test_a_sqlite_live_count_below_the_truth_never_blocks_a_settle_or_sweep(
    tmp_path: Path,
) -> None:
    from gatewaykit.ledger.sqlite import SQLiteLedger

    clock = FakeClock()
    path = tmp_path / "drift.db"

    async def drift(ledger: Ledger) -> Ledger:
        await ledger.aclose()
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("UPDATE counters SET live = 0 WHERE scope = 'user:a'")
        conn.close()
        reopened = SQLiteLedger(str(path), clock=clock)
        await reopened.open()
        return reopened

    ledger = SQLiteLedger(str(path), clock=clock)
    await ledger.open()
    await _drift_then_end(ledger, clock, drift)


@pytest.mark.postgres
async def test_a_postgres_live_count_below_the_truth_never_blocks_a_settle_or_sweep() -> None:
    import asyncpg

    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    clock = FakeClock()
    async with fresh_schema("gk_drift") as schema:

        async def drift(ledger: Ledger) -> Ledger:
            admin: Any = await asyncpg.connect(DSN)
            try:
                await admin.execute(
                    f'UPDATE "{schema}".counters SET live = 0 WHERE scope = $1', "user:a"
                )
            finally:
                await admin.close()
            return ledger

        ledger = PostgresLedger(DSN, schema=schema, clock=clock)
        await ledger.open()
        await _drift_then_end(ledger, clock, drift)


def test_sqlite_migration_5_reads_the_live_holds_once_not_once_per_counter() -> None:
    """Counting every window's live holds with a subquery per counter row scans the live
    holds once per row: 100,000 counters and 500 leftover live holds took ~9 s here, under
    the write lock, before the gateway could start. The holds are grouped once instead."""
    from gatewaykit.ledger._sqlite_schema import MIGRATIONS

    conn = sqlite3.connect(":memory:", isolation_level=None)
    for version in (1, 2, 3, 4):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO counters VALUES ('key:k', 0, 0, 10), ('key:j', 0, 0, 0)")
    for hold_id in ("r1", "r2"):
        conn.execute(
            "INSERT INTO holds (hold_id, scopes, amount, state, created_at, expires_at) "
            "VALUES (?, 'key:k', 5, 'held', 0, 1)",
            (hold_id,),
        )
        conn.execute("INSERT INTO hold_scopes VALUES (?, 'key:k', 0)", (hold_id,))
    for statement in MIGRATIONS[5]:
        if statement.lstrip().upper().startswith(("UPDATE", "INSERT")):
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}")]
            correlated = any("CORRELATED" in step for step in plan)
            assert not (correlated and any("SCAN h" in step for step in plan)), plan
        conn.execute(statement)
    live = dict(conn.execute("SELECT scope, live FROM counters").fetchall())
    assert live == {"key:k": 2, "key:j": 0}
