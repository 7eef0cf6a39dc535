"""SQLiteLedger specifics: schema versions, foreign files, durability settings, group
commit failure handling, lock timeouts, several connections, crash safety (F14)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gatewaykit.errors import (
    BudgetExceeded,
    InvalidLedgerURLError,
    LedgerError,
    LedgerUnavailableError,
    SchemaError,
)
from gatewaykit.ledger import open_ledger
from gatewaykit.ledger import sqlite as sqlite_module
from gatewaykit.ledger._sqlite_schema import APPLICATION_ID, LATEST_VERSION, MIGRATIONS
from gatewaykit.ledger.base import ApiKeyRecord, HoldState, Period, UsageRecord
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.money import from_nanos
from tests.ledger.backends import FakeClock

pytestmark = pytest.mark.anyio

D = Decimal
ROOT = Path(__file__).resolve().parents[2]


async def test_open_ledger_urls(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path}/a.db")
    assert isinstance(ledger, SQLiteLedger)
    async with ledger:
        await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
    assert (tmp_path / "a.db").exists()
    memory = open_ledger("sqlite://:memory:", synchronous="NORMAL")
    assert isinstance(memory, SQLiteLedger)
    assert memory.synchronous == "NORMAL"
    with pytest.raises(InvalidLedgerURLError):
        open_ledger("sqlite://relative.db")
    with pytest.raises(InvalidLedgerURLError):
        open_ledger("mysql://x")


async def test_durable_settings(tmp_path: Path) -> None:
    async with SQLiteLedger(str(tmp_path / "a.db")) as ledger:
        await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
    conn = sqlite3.connect(tmp_path / "a.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("SELECT version FROM gatewaykit_schema").fetchall() == [(LATEST_VERSION,)]
    conn.close()
    assert "FULL" in repr(SQLiteLedger(str(tmp_path / "a.db")))


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path)):
        pass
    conn = sqlite3.connect(path)
    conn.execute("UPDATE gatewaykit_schema SET version = ?", (LATEST_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match=r"newer gatewaykit.*upgrade"):
        await SQLiteLedger(str(path)).open()


async def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(SchemaError, match="did not create; use a new file"):
        await SQLiteLedger(str(path)).open()
    # Nothing was written to the foreign file.
    conn = sqlite3.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert tables == ["notes"]


async def test_corrupt_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(SchemaError, match="not a readable SQLite database"):
        await SQLiteLedger(str(path)).open()


async def test_unopenable_path(tmp_path: Path) -> None:
    with pytest.raises(LedgerUnavailableError):
        await SQLiteLedger(str(tmp_path / "missing-dir" / "a.db")).open()


async def test_not_open(tmp_path: Path) -> None:
    ledger = SQLiteLedger(str(tmp_path / "a.db"))
    with pytest.raises(LedgerUnavailableError, match="not open"):
        await ledger.status("user:a")
    await ledger.aclose()  # closing a closed ledger is harmless


@pytest.mark.parametrize(
    "kwargs",
    [{"synchronous": "OFF"}, {"busy_timeout": -1}, {"busy_timeout": True}],
    ids=str,
)
def test_bad_constructor_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        SQLiteLedger(":memory:", **kwargs)


async def test_check_detects_a_corrupted_counter(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path)) as ledger:
        await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
        await ledger.reserve("r2", ["user:a"], D(1), ttl=60)
        await ledger.settle("r2", D("0.5"))
        assert await ledger.check() == []
        conn = sqlite3.connect(path)
        conn.execute("UPDATE counters SET reserved = reserved + 7, spent = spent + 1")
        conn.execute("UPDATE holds SET late = 1 WHERE hold_id = 'r1'")
        conn.commit()
        conn.close()
        problems = await ledger.check()
    assert any(p.startswith("I2: user:a") for p in problems), problems
    assert any(p.startswith("I3: user:a") for p in problems), problems
    assert any(p.startswith("I4:") for p in problems), problems


async def test_negative_totals_are_refused_not_clamped(tmp_path: Path) -> None:
    """I9 is enforced by the database: a write that would go negative fails loudly."""
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path)) as ledger:
        await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
        conn = sqlite3.connect(path)
        conn.execute("UPDATE counters SET reserved = 0")
        conn.commit()
        conn.close()
        with pytest.raises(LedgerError, match="invariant"):
            await ledger.release("r1")
        hold = await ledger.get_hold("r1")
        assert hold is not None
        assert hold.live  # the failed release changed nothing
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.IntegrityError):  # I11: a float cannot even be stored
        conn.execute("UPDATE counters SET spent = 0.5")
    conn.close()


async def test_other_connections_changes_are_seen(tmp_path: Path) -> None:
    """Two ledgers on one file: cached budgets and counters follow the other's commits."""
    path = str(tmp_path / "a.db")
    async with SQLiteLedger(path) as first, SQLiteLedger(path) as second:
        await first.set_budget("user:a", limit=D(2))
        await second.reserve("r1", ["user:a"], D(2), ttl=60)
        with pytest.raises(BudgetExceeded):
            await first.reserve("r2", ["user:a"], D(1), ttl=60)
        await first.set_budget("user:a", limit=D(3))
        await second.reserve("r2", ["user:a"], D(1), ttl=60)
        await first.settle("r1", D(1))
        with pytest.raises(BudgetExceeded):
            await second.reserve("r3", ["user:a"], D("1.5"), ttl=60)
        await second.reserve("r3", ["user:a"], D(1), ttl=60)
        assert await first.check() == []
        status = await second.status("user:a")
        assert status is not None
        assert (status.spent, status.held) == (D(1), D(2))


async def test_locked_database_fails_closed_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path), busy_timeout=0.05) as ledger:
        await ledger.set_budget("user:a", limit=D(5))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(LedgerUnavailableError, match="locked"):
                await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        hold = await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
        assert hold.live
        assert await ledger.check() == []


class _FailingCommit:
    """A connection proxy whose next COMMIT fails like a full disk would."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.fail_next = False

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)


async def test_commit_failure_fails_every_operation_of_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxies: list[_FailingCommit] = []
    connect = sqlite_module._Writer._connect

    def wrapped(self: Any) -> Any:
        proxy = _FailingCommit(connect(self))
        proxies.append(proxy)
        return proxy

    monkeypatch.setattr(sqlite_module._Writer, "_connect", wrapped)
    async with SQLiteLedger(str(tmp_path / "a.db")) as ledger:
        await ledger.set_budget("user:a", limit=D(100))
        proxies[0].fail_next = True
        results = await asyncio.gather(
            *(ledger.reserve(f"r{i}", ["user:a"], D(1), ttl=60) for i in range(20)),
            return_exceptions=True,
        )
        failed = [r for r in results if isinstance(r, LedgerUnavailableError)]
        assert failed, "the failing commit failed nobody"
        assert all("disk I/O error" in str(r) for r in failed)
        for i, result in enumerate(results):  # never acknowledged and gone, nor the reverse
            stored = await ledger.get_hold(f"r{i}")
            assert (stored is not None) == (not isinstance(result, BaseException))
        status = await ledger.status("user:a")
        assert status is not None
        assert status.held == D(20 - len(failed))
        assert await ledger.check() == []


async def test_cancelled_reserve_is_an_unknown_outcome(tmp_path: Path) -> None:
    """F15: a cancelled caller's reserve may still commit; an idempotent release cures it."""
    async with SQLiteLedger(str(tmp_path / "a.db")) as ledger:
        tasks = [
            asyncio.ensure_future(ledger.reserve(f"r{i}", ["user:a"], D(1), ttl=60))
            for i in range(50)
        ]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(ledger.release(f"r{i}") for i in range(50)))
        status = await ledger.status("user:a")
        assert status is None or status.held == 0
        assert await ledger.holds() == []
        assert await ledger.check() == []


async def test_in_memory_ledgers_are_independent() -> None:
    async with SQLiteLedger(":memory:") as a, SQLiteLedger(":memory:") as b:
        await a.reserve("r1", ["user:a"], D(1), ttl=60)
        assert await b.get_hold("r1") is None


async def test_period_change_keeps_holds_in_their_window(tmp_path: Path) -> None:
    clock = FakeClock()
    async with SQLiteLedger(str(tmp_path / "a.db"), clock=clock) as ledger:
        await ledger.set_budget("user:a", limit=D(5), period=Period("day"))
        await ledger.reserve("r1", ["user:a"], D(2), ttl=60)
        await ledger.set_budget("user:a", limit=D(5), period=Period("month"))
        status = await ledger.status("user:a")
        assert status is not None
        assert status.held == 0  # the month window is a different counter
        assert (await ledger.settle("r1", D(1))).state is HoldState.SETTLED
        assert await ledger.check() == []


_WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from decimal import Decimal
    from gatewaykit.ledger.sqlite import SQLiteLedger

    async def main(path):
        async with SQLiteLedger(path) as ledger:
            await ledger.set_budget("user:a", limit=Decimal(10**6))
            i = 0
            while True:
                batch = [f"{sys.argv[2]}-{i + j}" for j in range(8)]
                await asyncio.gather(*(
                    ledger.reserve(h, ["user:a", "key:k"], Decimal("0.01"), ttl=3600)
                    for h in batch))
                await asyncio.gather(*(
                    ledger.settle(h, Decimal("0.005")) for h in batch[::2]))
                i += 8
                print(i, flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


def _run_and_kill(path: Path, runs: int) -> None:
    """Start a writer process, let it acknowledge some work, SIGKILL it mid-flight."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for run in range(runs):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(path), f"run{run}"],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        for _ in range(5 + 7 * run):  # kill at a different point each run
            assert proc.stdout.readline(), "worker died early"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()


@pytest.mark.slow
async def test_f14_killed_mid_transaction_reopens_consistent(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    _run_and_kill(path, runs=3)
    async with SQLiteLedger(str(path)) as ledger:
        assert await ledger.check() == []
        live = await ledger.holds(limit=10_000)
        status = await ledger.status("user:a")
        assert status is not None
        assert status.held == D("0.01") * len(live)
        assert len(live) >= 4 * 3  # each run acknowledged unsettled holds before dying
    # F9: the dead processes' holds expire on their own (TTL 3600 s), never earlier.
    later = time.time() + 3601
    async with SQLiteLedger(str(path), clock=lambda: later) as ledger:
        assert await ledger.sweep() == len(live)
        status = await ledger.status("user:a")
        assert status is not None
        assert status.held == 0
        assert await ledger.check() == []


async def test_a_failing_operation_fails_alone_in_its_batch(tmp_path: Path) -> None:
    """A conflict or refused write in a batch undoes only that operation."""
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path)) as ledger:
        await ledger.reserve("r0", ["user:a"], D(1), ttl=60)
        await ledger.reserve("bad", ["user:b"], D(1), ttl=60)
        conn = sqlite3.connect(path)
        conn.execute("UPDATE counters SET reserved = 0 WHERE scope = 'user:b'")
        conn.commit()
        conn.close()
        results = await asyncio.gather(
            ledger.reserve("r1", ["user:a"], D(1), ttl=60),
            ledger.reserve("r0", ["user:a"], D(2), ttl=60),  # conflict
            ledger.release("bad"),  # would drive user:b negative (I9)
            ledger.settle("r0", D("0.5")),
            ledger.reserve("r2", ["user:a"], D(1), ttl=60),
            return_exceptions=True,
        )
        assert [type(r).__name__ for r in results] == [
            "Hold",
            "HoldConflictError",
            "LedgerError",
            "Hold",
            "Hold",
        ]
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.held, status.spent) == (D(2), D("0.5"))
        bad = await ledger.get_hold("bad")
        assert bad is not None
        assert bad.live


async def test_f15_a_cancelled_caller_can_leave_a_ghost_hold_that_release_cures(
    tmp_path: Path,
) -> None:
    """The writer already holds the reserve when its caller is cancelled: it still commits."""
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path), busy_timeout=10) as ledger:
        await ledger.set_budget("user:a", limit=D(5))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # the writer's batch waits for this lock
        task = asyncio.ensure_future(ledger.reserve("ghost", ["user:a"], D(1), ttl=60))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        blocker.execute("ROLLBACK")
        blocker.close()
        ghost = await ledger.get_hold("ghost")
        assert ghost is not None
        assert ghost.live  # committed although nobody awaited it
        released = await ledger.release("ghost")  # the unknown-outcome cure
        assert released.state is HoldState.RELEASED
        status = await ledger.status("user:a")
        assert status is not None
        assert status.held == 0


@pytest.mark.parametrize(
    "nanos", [0, 1, -1, 10, 79_000, 1_500_000_000, 10**9, -(10**9), 123_456_789_012, 9 * 10**18]
)
def test_headroom_usd_is_from_nanos_exactly(nanos: int) -> None:
    """The fast conversion behind Hold.remaining: same value and same digits (headers)."""
    expected = from_nanos(nanos)
    got = sqlite_module._headroom_usd(nanos)
    assert (got.as_tuple(), str(got)) == (expected.as_tuple(), str(expected))


# -- response contexts (schema version 2) ----------------------------------------------------


async def test_a_version_1_file_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    pass


def _usage(request_id: str, input_tokens: int = 10) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        model="gpt-test",
        endpoint="chat.completions",
        status="success",
        usage_source="provider",
        input_tokens=input_tokens,
        cost=D("0.5"),
    )


async def _settle_in_one_batch(path: Path, ledger: SQLiteLedger, absurd: int) -> list[Any]:
    """Settle 16 holds in ONE group-commit batch, the ``absurd``-th with 10**30 tokens."""
    await asyncio.gather(*(ledger.reserve(f"r{i}", ["user:a"], D(1), ttl=60) for i in range(16)))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the writer's next batch waits for this lock
    first = asyncio.ensure_future(ledger.get_hold("r0"))
    await asyncio.sleep(0.1)  # the writer took `first` alone and waits for the lock
    settles = asyncio.gather(
        *(
            ledger.settle(f"r{i}", D("0.5"), record=_usage(f"r{i}", 10**30 if i == absurd else 10))
            for i in range(16)
        ),
        return_exceptions=True,
    )
    await asyncio.sleep(0.1)  # every settle is queued behind `first`
    blocker.execute("ROLLBACK")
    blocker.close()
    await first
    return list(await settles)


async def test_an_unstorable_record_is_refused_before_it_joins_a_batch(tmp_path: Path) -> None:
    """10**30 tokens (an OverflowError in sqlite3) once failed every settle of its batch."""
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path), busy_timeout=10) as ledger:
        results = await _settle_in_one_batch(path, ledger, absurd=5)
        assert [type(r).__name__ for r in results] == ["Hold"] * 5 + ["ConfigurationError"] + [
            "Hold"
        ] * 10
        assert "MAX_TOKENS" in str(results[5])
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.spent, status.held) == (D("7.5"), D(1))
        # The hold is not lost: a storable record settles it.
        assert (await ledger.settle("r5", D("0.5"), record=_usage("r5"))).state is (
            HoldState.SETTLED
        )
        assert len(await ledger.usage()) == 16
        assert await ledger.check() == []


async def test_any_exception_of_one_operation_is_isolated_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were an unstorable record to reach the writer, its savepoint undoes it alone."""
    monkeypatch.setattr(  # skip the validation that normally refuses it before queueing
        sqlite_module, "_record_cost", lambda record: 0 if record is None else 500_000_000
    )
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path), busy_timeout=10) as ledger:
        results = await _settle_in_one_batch(path, ledger, absurd=3)
        assert [type(r).__name__ for r in results] == ["Hold"] * 3 + ["LedgerError"] + ["Hold"] * 12
        assert "OverflowError" in str(results[3])
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.spent, status.held) == (D("7.5"), D(1))
        r3 = await ledger.get_hold("r3")
        assert r3 is not None
        assert r3.live
        assert await ledger.check() == []


def _spy_writer(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """(sizes of the items put on the writer's queue, sizes of the batches it ran)."""
    items: list[int] = []
    batches: list[int] = []
    flush, run = sqlite_module._Writer.flush, sqlite_module._Writer._run

    def spy_flush(self: Any, loop: asyncio.AbstractEventLoop) -> None:
        items.append(len(self.pending.get(loop, ())))
        flush(self, loop)

    def spy_run(store: Any, batch: list[Any], now: int, *, isolate: bool) -> Any:
        if not isolate:
            batches.append(len(batch))
        return run(store, batch, now, isolate=isolate)

    monkeypatch.setattr(sqlite_module._Writer, "flush", spy_flush)
    monkeypatch.setattr(sqlite_module._Writer, "_run", staticmethod(spy_run))
    return items, batches


async def test_one_loop_iterations_operations_reach_the_writer_as_one_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One hand-off to the writer per loop iteration, however many tasks submitted."""
    items, batches = _spy_writer(monkeypatch)
    async with SQLiteLedger(str(tmp_path / "a.db")) as ledger:
        await ledger.set_budget("user:a", limit=D(10_000))
        items.clear()
        batches.clear()
        held = await asyncio.gather(
            *(ledger.reserve(f"r{i}", ["user:a"], D(1), ttl=60) for i in range(100))
        )
        assert all(h.live for h in held)
        assert (items, batches) == ([100], [100])
        # More than a batch may hold: one hand-off, several batches of at most 512.
        items.clear()
        batches.clear()
        await asyncio.gather(
            *(ledger.settle(f"r{i}", D(1)) for i in range(100)),
            *(ledger.reserve(f"s{i}", ["user:a"], D(1), ttl=60) for i in range(1100)),
        )
        assert items == [1200]
        assert batches == [512, 512, 176]
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.spent, status.held) == (D(100), D(1100))
        assert await ledger.check() == []


async def test_operations_cancelled_before_their_hand_off_never_happen(tmp_path: Path) -> None:
    async with SQLiteLedger(str(tmp_path / "a.db")) as ledger:
        tasks = [
            asyncio.ensure_future(ledger.reserve(f"r{i}", ["user:a"], D(1), ttl=60))
            for i in range(20)
        ]
        await asyncio.sleep(0)  # each task submitted its reserve; the hand-off is next
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert all(task.cancelled() for task in tasks)
        assert [await ledger.get_hold(f"r{i}") for i in range(20)] == [None] * 20
        assert await ledger.status("user:a") is None


async def test_operations_submitted_just_before_close_still_run(tmp_path: Path) -> None:
    path = str(tmp_path / "a.db")
    ledger = SQLiteLedger(path)
    await ledger.open()
    task = asyncio.ensure_future(ledger.reserve("r1", ["user:a"], D(1), ttl=60))
    await asyncio.sleep(0)  # submitted, not yet handed to the writer
    await ledger.aclose()
    assert (await task).live
    with pytest.raises(LedgerUnavailableError, match="not open"):
        await ledger.reserve("r2", ["user:a"], D(1), ttl=60)
    async with SQLiteLedger(path) as again:
        hold = await again.get_hold("r1")
        assert hold is not None
        assert hold.live


async def _until(predicate: Any, seconds: float = 10.0) -> float:
    """Poll ``predicate`` until true; return how long it took (fail after ``seconds``)."""
    started = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - started < seconds, "timed out"
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


async def test_key_epoch_follows_own_and_other_connections_key_changes(tmp_path: Path) -> None:
    path = str(tmp_path / "a.db")
    async with SQLiteLedger(path) as gateway, SQLiteLedger(path) as cli:
        start = gateway.key_epoch
        await gateway.create_key(ApiKeyRecord(key_id="k1", key_hash="a" * 64, prefix="p", user="u"))
        assert gateway.key_epoch > start  # its own change counts before it returns
        seen = gateway.key_epoch
        # Another connection's commit that changes no key moves nothing.
        await cli.reserve("r1", ["user:a"], D(1), ttl=60)
        await gateway.get_hold("r1")  # a batch: it notices the foreign commit
        assert gateway.key_epoch == seen
        assert not await cli.revoke_key("missing")
        await gateway.get_hold("r1")
        assert gateway.key_epoch == seen
        # Another connection's revocation: noticed by an idle writer too (no batch runs).
        assert await cli.revoke_key("k1")
        await _until(lambda: gateway.key_epoch > seen, seconds=5)
        seen = gateway.key_epoch
        # ... and at the start of the next batch when busy.
        await cli.create_key(ApiKeyRecord(key_id="k2", key_hash="b" * 64, prefix="p", user="u"))
        await gateway.get_hold("r1")
        assert gateway.key_epoch > seen


async def test_a_version_1_file_gets_the_response_contexts_table(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO gatewaykit_schema (version) VALUES (1)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(
        "INSERT INTO budgets (scope, limit_nanos, period_kind, updated_at) "
        "VALUES ('user:a', 5000000000, 'none', 0)"
    )
    conn.close()
    async with SQLiteLedger(str(path)) as ledger:
        status = await ledger.status("user:a")
        assert status is not None
        assert status.limit == D(5)
        assert await ledger.response_context("resp_1", "user:a") is None
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM gatewaykit_schema").fetchall() == [(LATEST_VERSION,)]
    assert conn.execute("SELECT count(*) FROM response_contexts").fetchone() == (0,)
    conn.close()


async def test_sweep_prunes_expired_response_contexts(tmp_path: Path) -> None:
    from gatewaykit.ledger.base import ResponseContext, UsageRecord

    clock = FakeClock()
    path = tmp_path / "a.db"
    async with SQLiteLedger(str(path), clock=clock) as ledger:
        for n, ttl in enumerate((10, 10, 1000)):
            await ledger.reserve(f"r{n}", ["user:a"], D(1), ttl=60)
            context = ResponseContext("user:a", 5, response_id=f"resp_{n}", ttl=ttl)
            record = UsageRecord(
                f"r{n}", "m", "responses", "success", "provider", response_context=context
            )
            await ledger.settle(f"r{n}", D("0.1"), record=record)
        clock.advance(10)
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT count(*) FROM response_contexts").fetchone() == (3,)
        await ledger.sweep()
        assert conn.execute("SELECT context_id FROM response_contexts").fetchall() == [("resp_2",)]
        conn.close()


async def test_a_failed_batch_keeps_the_contexts_of_its_good_operations(tmp_path: Path) -> None:
    """A batch with a failing operation is rolled back (with the contexts written straight
    into it) and redone one operation at a time: the good settle's context is written
    again, the failed one's never."""
    from gatewaykit.ledger.base import ResponseContext, UsageRecord

    async with SQLiteLedger(str(tmp_path / "a.db")) as ledger:
        await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
        await ledger.reserve("r2", ["user:a"], D(1), ttl=60)
        await ledger.settle("r2", D("0.1"))

        def record(n: int) -> UsageRecord:
            context = ResponseContext("user:a", 10 * n, response_id=f"resp_{n}")
            return UsageRecord(
                f"r{n}", "m", "responses", "success", "provider", response_context=context
            )

        results = await asyncio.gather(
            ledger.settle("r1", D("0.1"), record=record(1)),
            ledger.settle("r2", D("0.2"), record=record(2)),  # a conflicting replay
            return_exceptions=True,
        )
        assert not isinstance(results[0], BaseException)
        assert isinstance(results[1], LedgerError)
        assert await ledger.response_context("resp_1", "user:a") == 10
        assert await ledger.response_context("resp_2", "user:a") is None
        assert await ledger.check() == []


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO gatewaykit_schema (version) VALUES (1)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(
        "INSERT INTO api_keys (key_id, key_hash, prefix, user, created_at) "
        "VALUES ('k1', ?, 'p', 'u', 0)",
        ("a" * 64,),
    )
    conn.close()
    async with SQLiteLedger(str(path)) as ledger:
        assert await ledger.revoke_key("k1")
        key = await ledger.find_key("a" * 64)
        assert key is not None
        assert key.revoked
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM gatewaykit_schema").fetchall() == [(LATEST_VERSION,)]
    assert conn.execute("SELECT epoch FROM key_epoch").fetchall() == [(1,)]
    conn.close()


async def test_a_version_3_file_gets_the_usage_indexes_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for version in (1, 2, 3):
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("INSERT INTO gatewaykit_schema (version) VALUES (3)")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(
        "INSERT INTO usage_records (request_id, user, model, endpoint, status, usage_source, "
        "input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos, "
        "latency_ms, created_at) VALUES ('r1', 'u', 'm', 'e', 'success', 'provider', "
        "1, 2, 0, 0, 500, 7, 86400000000)"
    )
    conn.close()
    async with SQLiteLedger(str(path)) as ledger:
        (record,) = await ledger.usage(user="u")
        assert (record.latency_ms, record.cost) == (7, D("0.0000005"))
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM gatewaykit_schema").fetchall() == [(LATEST_VERSION,)]
    plans = {
        where: " ".join(
            row[3]
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN SELECT * FROM usage_records WHERE {where} "
                "ORDER BY created_at DESC, seq DESC LIMIT 10"
            )
        )
        for where in ("created_at >= 0", "user = 'u'", "key_id = 'k'")
    }
    conn.close()
    assert "usage_time" in plans["created_at >= 0"]
    assert "usage_user_time" in plans["user = 'u'"]
    assert "usage_key_time" in plans["key_id = 'k'"]
    assert all("TEMP B-TREE" not in plan for plan in plans.values())  # no sort step
