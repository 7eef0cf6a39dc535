"""PostgresLedger beyond the shared conformance suite: concurrency, sweepers, failure.

Every test gets its own schema on the server named by GATEWAYKIT_TEST_POSTGRES_DSN.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import anyio
import anyio.abc
import asyncpg
import pytest

from gatewaykit.errors import (
    BudgetExceeded,
    ConfigurationError,
    HoldConflictError,
    LedgerUnavailableError,
    SchemaError,
)
from gatewaykit.ledger import open_ledger
from gatewaykit.ledger.base import ApiKeyRecord, HoldState, Period, UsageRecord
from gatewaykit.ledger.postgres import _RESERVE, PostgresLedger
from tests.ledger.backend_postgres import DSN, fresh_schema
from tests.ledger.backends import FakeClock

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

AMOUNT = Decimal("0.01")


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    async with fresh_schema() as name:
        yield name


async def _reserve_all(
    ledgers: list[PostgresLedger], n: int, scopes: list[str], *, prefix: str = "h"
) -> tuple[list[str], int]:
    """``n`` concurrent reserves spread round-robin over ``ledgers``; (admitted ids, refused)."""
    admitted: list[str] = []
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        try:
            hold = await ledgers[i % len(ledgers)].reserve(f"{prefix}{i}", scopes, AMOUNT, ttl=60)
        except BudgetExceeded:
            refused += 1
        else:
            assert hold.live
            admitted.append(hold.hold_id)

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, i)
    return admitted, refused


@pytest.mark.parametrize("batch_max", [1, 64])
async def test_f1_concurrent_reserves_admit_exactly_the_capacity(
    schema: str, batch_max: int
) -> None:
    async with PostgresLedger(DSN, schema=schema, pool_max=8, batch_max=batch_max) as ledger:
        await ledger.set_budget("user:a", limit=AMOUNT * 50)
        admitted, refused = await _reserve_all([ledger], 200, ["user:a"])
        assert (len(admitted), refused) == (50, 150)
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.held, status.spent) == (AMOUNT * 50, Decimal(0))
        assert await ledger.check() == []


async def test_queued_reserves_on_one_budget_share_round_trips(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    run_batch = PostgresLedger._run_batch

    async def spy(self: PostgresLedger, sql: str, batch: list[Any]) -> None:
        sizes.append(len(batch))
        await run_batch(self, sql, batch)

    monkeypatch.setattr(PostgresLedger, "_run_batch", spy)
    async with PostgresLedger(DSN, schema=schema, pool_max=4) as ledger:
        await ledger.set_budget("user:a", limit=AMOUNT * 100)
        await ledger.reserve("warm", ["user:a"], AMOUNT, ttl=60)  # counter rows exist
        sizes.clear()
        admitted, _ = await _reserve_all([ledger], 80, ["user:a"])
        assert len(admitted) == 80
        assert sum(sizes) == 80
        assert max(sizes) > 1, sizes


async def test_a_deadlocked_batch_is_rerun_one_by_one(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If PostgreSQL aborts a grouped batch (deadlock), nothing of it committed: each
    operation is sent again on its own and gets its own, correct reply."""
    async with PostgresLedger(DSN, schema=schema, pool_max=4) as ledger:
        await ledger.set_budget("user:a", limit=AMOUNT * 30)
        await ledger.reserve("warm", ["user:a"], AMOUNT, ttl=60)
        failed: list[int] = []

        @contextlib.asynccontextmanager
        async def conn_failing_batches() -> Any:
            async with original() as conn:

                class Wrapped:
                    def __getattr__(self, name: str) -> Any:
                        return getattr(conn, name)

                    async def fetchmany(self, sql: str, args: list[Any]) -> Any:
                        failed.append(len(args))
                        raise asyncpg.DeadlockDetectedError("deadlock detected")

                yield Wrapped()

        original = ledger._conn
        monkeypatch.setattr(ledger, "_conn", conn_failing_batches)
        admitted, refused = await _reserve_all([ledger], 60, ["user:a"])
        assert failed, "no batch was formed"
        assert (len(admitted), refused) == (29, 31)
        assert await ledger.check() == []


async def test_two_instances_with_separate_pools_never_over_admit(schema: str) -> None:
    async with (
        PostgresLedger(DSN, schema=schema, pool_max=4) as one,
        PostgresLedger(DSN, schema=schema, pool_max=4) as two,
    ):
        await one.set_budget("team:t", limit=AMOUNT * 37)
        admitted, refused = await _reserve_all([one, two], 200, ["team:t", "user:u"])
        assert (len(admitted), refused) == (37, 163)

        # Settle everything from the *other* instance than the one that reserved.
        async def settle(i: int, hold_id: str) -> None:
            await (two if i % 2 == 0 else one).settle(hold_id, AMOUNT / 2)

        async with anyio.create_task_group() as tg:
            for i, hold_id in enumerate(admitted):
                tg.start_soon(settle, i, hold_id)
        status = await two.status("team:t")
        assert status is not None
        assert (status.spent, status.held) == (AMOUNT / 2 * 37, Decimal(0))
        assert await one.check() == []


async def test_multi_scope_holds_in_opposite_orders_do_not_deadlock(schema: str) -> None:
    """Reserves over overlapping scope sets, all at once: all-or-none, no deadlock."""
    async with PostgresLedger(DSN, schema=schema, pool_max=8, batch_max=1) as ledger:
        scopes = ["team:t", "user:a", "user:b", "key:k"]
        for scope in scopes:
            await ledger.set_budget(scope, limit=AMOUNT * 40)
        sets = [["team:t", "user:a"], ["user:b", "team:t"], ["key:k", "user:a", "user:b"]]
        admitted: list[list[str]] = []

        async def one(i: int) -> None:
            chosen = sets[i % len(sets)]
            try:
                await ledger.reserve(f"m{i}", chosen, AMOUNT, ttl=60)
            except BudgetExceeded:
                return
            admitted.append(chosen)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(150):
                    tg.start_soon(one, i)
        for scope in scopes:
            status = await ledger.status(scope)
            assert status is not None
            count = sum(scope in chosen for chosen in admitted)
            assert status.held == AMOUNT * count <= AMOUNT * 40
        assert await ledger.check() == []


async def test_f17_replay_storm_gives_one_hold_and_identical_replies(schema: str) -> None:
    async with PostgresLedger(DSN, schema=schema, pool_max=8) as ledger:
        replies = []

        async def one() -> None:
            replies.append(await ledger.reserve("same", ["user:a"], AMOUNT, ttl=60))

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(one)
        assert len(set(replies)) == 1
        status = await ledger.status("user:a")
        assert status is not None
        assert status.held == AMOUNT
        with pytest.raises(HoldConflictError):
            await ledger.reserve("same", ["user:a"], AMOUNT * 2, ttl=60)
        assert await ledger.check() == []


async def test_f18_concurrent_sweepers_release_each_expired_hold_once(schema: str) -> None:
    clock = FakeClock()
    ledgers = [
        PostgresLedger(DSN, schema=schema, pool_max=3, clock=clock, sweep_batch=7) for _ in range(4)
    ]
    async with ledgers[0], ledgers[1], ledgers[2], ledgers[3]:
        await ledgers[0].set_budget("user:a", limit=Decimal(100))
        admitted, _ = await _reserve_all(ledgers, 120, ["user:a", "team:t"])
        assert len(admitted) == 120
        clock.advance(61)
        counts: list[int] = []

        async def sweep(ledger: PostgresLedger) -> None:
            counts.append(await ledger.sweep())

        async with anyio.create_task_group() as tg:
            for ledger in ledgers * 3:
                tg.start_soon(sweep, ledger)
        assert sum(counts) == 120
        assert len([c for c in counts if c]) > 1, "expected the sweepers to share the work"
        assert await ledgers[1].holds() == []
        assert all(h.state is HoldState.EXPIRED for h in await ledgers[2].holds(live_only=False))
        status = await ledgers[3].status("user:a")
        assert status is not None
        assert status.held == 0
        assert await ledgers[0].check() == []


async def test_a_due_hold_locked_elsewhere_makes_a_refusal_retry(schema: str) -> None:
    """Reserve skips due holds another transaction has locked (SKIP LOCKED); that one is
    about to release them, so a refusal is flagged ``skipped`` and retried, not final."""
    clock = FakeClock()
    async with PostgresLedger(DSN, schema=schema, clock=clock) as ledger:
        await ledger.set_budget("user:a", limit=Decimal(1))
        await ledger.reserve("x", ["user:a"], Decimal(1), ttl=10)
        clock.advance(11)  # x is due, not yet reclaimed
        other: Any = await asyncpg.connect(DSN, server_settings={"search_path": schema})
        try:
            async with other.transaction():
                await other.execute("SELECT 1 FROM holds WHERE hold_id = 'x' FOR UPDATE")
                async with ledger._conn() as conn:
                    rows = await conn.fetch(_RESERVE, "y", ["user:a"], 10**9, timedelta(seconds=10))
                assert (rows[0]["admit"], rows[0]["skipped"]) == (False, True)
                with pytest.raises(BudgetExceeded):  # still locked after the retries
                    await ledger.reserve("y", ["user:a"], Decimal(1), ttl=10)
        finally:
            await other.close()
        # Unlocked: the next reserve reclaims x itself and fits.
        assert (await ledger.reserve("y", ["user:a"], Decimal(1), ttl=10)).live
        assert (await ledger.get_hold("x")).state is HoldState.EXPIRED  # type: ignore[union-attr]
        assert await ledger.check() == []


async def test_batched_settles_and_records(schema: str) -> None:
    async with PostgresLedger(DSN, schema=schema, pool_max=2) as ledger:
        admitted, _ = await _reserve_all([ledger], 60, ["user:a"])

        async def settle(hold_id: str) -> None:
            record = UsageRecord(
                request_id=hold_id,
                model="m",
                endpoint="/v1/chat/completions",
                status="success",
                usage_source="provider",
                user="a",
                cost=AMOUNT,
            )
            hold = await ledger.settle(hold_id, AMOUNT, record=record)
            assert hold.state is HoldState.SETTLED
            assert await ledger.settle(hold_id, AMOUNT) == hold

        async with anyio.create_task_group() as tg:
            for hold_id in admitted:
                tg.start_soon(settle, hold_id)
        assert len(await ledger.usage(user="a", limit=1000)) == 60
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.spent, status.held) == (AMOUNT * 60, Decimal(0))
        assert await ledger.check() == []


async def test_rolling_windows_follow_the_database_clock(schema: str) -> None:
    clock = FakeClock()
    async with PostgresLedger(DSN, schema=schema, clock=clock) as ledger:
        await ledger.set_budget("user:a", limit=AMOUNT, period=Period.parse(3600))
        hold = await ledger.reserve("a", ["user:a"], AMOUNT, ttl=7200)
        with pytest.raises(BudgetExceeded) as refused:
            await ledger.reserve("b", ["user:a"], AMOUNT, ttl=60)
        status = await ledger.status("user:a")
        assert status is not None
        assert refused.value.resets_at == status.resets_at
        clock.advance(3600)
        await ledger.reserve("c", ["user:a"], AMOUNT, ttl=60)  # a new window
        settled = await ledger.settle(hold.hold_id, AMOUNT)  # into the old window (I10)
        assert not settled.late
        now = await ledger.status("user:a")
        assert now is not None
        assert (now.spent, now.held) == (Decimal(0), AMOUNT)
        assert await ledger.check() == []


async def test_refused_reserve_leaves_no_counter_behind(schema: str) -> None:
    async with PostgresLedger(DSN, schema=schema) as ledger:
        await ledger.set_budget("user:a", limit=Decimal(0))
        with pytest.raises(BudgetExceeded):
            await ledger.reserve("x", ["user:a", "key:new"], AMOUNT, ttl=60)
        assert await ledger.status("key:new") is None
        assert [s.scope for s in await ledger.budgets()] == ["user:a"]


async def test_unreachable_server_fails_closed() -> None:
    ledger = PostgresLedger("postgresql://postgres:secret@127.0.0.1:1/nothing", connect_timeout=2.0)
    with pytest.raises(LedgerUnavailableError) as info:
        await ledger.open()
    assert "secret" not in str(info.value)
    assert "secret" not in repr(ledger)
    with pytest.raises(LedgerUnavailableError, match="not open"):
        await ledger.reserve("h", ["user:a"], AMOUNT, ttl=60)


class _Proxy:
    """A TCP forwarder to the test server that the test can cut and restore."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.scope: anyio.CancelScope | None = None

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        with anyio.CancelScope() as self.scope:
            async with listener:
                task_status.started()
                await listener.serve(self._pipe)

    async def _pipe(self, client: anyio.abc.SocketStream) -> None:
        async with client, await anyio.connect_tcp(*self.target) as server:

            async def copy(a: anyio.abc.SocketStream, b: anyio.abc.SocketStream) -> None:
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    async for chunk in a:
                        await b.send(chunk)
                tg.cancel_scope.cancel()

            async with anyio.create_task_group() as tg:
                tg.start_soon(copy, client, server)
                tg.start_soon(copy, server, client)

    def cut(self) -> None:
        """Close the listener and every open connection: the database is 'down'."""
        assert self.scope is not None
        self.scope.cancel()


async def test_store_down_fails_closed_and_recovers(schema: str) -> None:
    target = urllib.parse.urlsplit(DSN)
    proxy = _Proxy(target.hostname or "127.0.0.1", target.port or 5432)
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        url = DSN.replace(target.netloc, f"{target.username}@127.0.0.1:{proxy.port}")
        ledger = PostgresLedger(url, schema=schema, pool_max=2, connect_timeout=1.0)
        async with ledger:
            await ledger.reserve("up", ["user:a"], AMOUNT, ttl=60)
            proxy.cut()
            await anyio.sleep(0.05)
            for attempt in range(3):
                with pytest.raises(LedgerUnavailableError) as info:
                    await ledger.reserve(f"down{attempt}", ["user:a"], AMOUNT, ttl=60)
                assert "unavailable" in str(info.value)
            await tg.start(proxy.serve)  # the same port again: the database is back
            await ledger.reserve("back", ["user:a"], AMOUNT, ttl=60)
            assert {h.hold_id for h in await ledger.holds()} == {"up", "back"}
            assert await ledger.check() == []
            proxy.cut()


async def test_schema_of_a_newer_version_is_refused(schema: str) -> None:
    async with PostgresLedger(DSN, schema=schema):
        pass
    admin: Any = await asyncpg.connect(DSN)
    try:
        await admin.execute(f'INSERT INTO "{schema}".gatewaykit_schema (version) VALUES (99)')
    finally:
        await admin.close()
    with pytest.raises(SchemaError, match="newer"):
        await PostgresLedger(DSN, schema=schema).open()


async def test_foreign_tables_are_refused(schema: str) -> None:
    admin: Any = await asyncpg.connect(DSN)
    try:
        await admin.execute(f'CREATE TABLE "{schema}".holds (id int)')
    finally:
        await admin.close()
    with pytest.raises(SchemaError, match="not created by gatewaykit"):
        await PostgresLedger(DSN, schema=schema).open()


async def test_many_instances_migrate_one_schema_at_once(schema: str) -> None:
    ledgers = [PostgresLedger(DSN, schema=schema, pool_min=0, pool_max=1) for _ in range(6)]
    try:
        async with anyio.create_task_group() as tg:
            for ledger in ledgers:
                tg.start_soon(ledger.open)
        assert await ledgers[0].check() == []
    finally:
        for ledger in ledgers:
            await ledger.aclose()


async def test_open_ledger_routes_postgres_urls(schema: str) -> None:
    ledger = open_ledger(DSN, schema=schema)
    assert isinstance(ledger, PostgresLedger)
    async with ledger:
        await ledger.set_budget("user:a", limit=AMOUNT)
    by_url = open_ledger(f"{DSN}?schema={schema}")
    assert isinstance(by_url, PostgresLedger)
    assert (by_url.schema, by_url.url) == (schema, DSN)
    async with by_url:
        assert [b.scope for b in await by_url.budgets()] == ["user:a"]


def test_bad_options_are_refused_where_given() -> None:
    with pytest.raises(ConfigurationError):
        PostgresLedger("sqlite:///x.db")
    with pytest.raises(ConfigurationError):
        PostgresLedger(DSN, schema="x; DROP TABLE y")
    with pytest.raises(ConfigurationError):
        PostgresLedger(DSN, pool_min=5, pool_max=2)


def test_importing_gatewaykit_does_not_import_asyncpg() -> None:
    code = "import sys, gatewaykit, gatewaykit.ledger; print('asyncpg' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"


# -- response contexts ----------------------------------------------------------------------


def _context_record(n: int, tokens: int, growth: int, conversation: str | None = None) -> Any:
    from gatewaykit.ledger.base import ResponseContext

    context = ResponseContext(
        "user:a", tokens, response_id=f"resp_{n}", conversation_id=conversation, growth=growth
    )
    return UsageRecord(f"r{n}", "m", "responses", "success", "provider", response_context=context)


async def test_a_version_1_schema_is_migrated(schema: str) -> None:
    from gatewaykit.ledger._postgres_schema import MIGRATIONS, SCHEMA_VERSION

    admin: Any = await asyncpg.connect(DSN)
    try:
        await admin.execute(f'SET search_path TO "{schema}"')
        await admin.execute(MIGRATIONS[0])
        await admin.execute("INSERT INTO gatewaykit_schema (version) VALUES (1)")
    finally:
        await admin.close()
    async with PostgresLedger(DSN, schema=schema) as ledger:
        await ledger.reserve("r1", ["user:a"], AMOUNT, ttl=60)
        await ledger.settle("r1", AMOUNT, record=_context_record(1, 70, 70))
        assert await ledger.response_context("resp_1", "user:a") == 70
    admin = await asyncpg.connect(DSN)
    try:
        versions = await admin.fetch(f'SELECT version FROM "{schema}".gatewaykit_schema')
        assert sorted(r["version"] for r in versions) == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await admin.close()


async def test_concurrent_turns_on_one_conversation_all_count(schema: str) -> None:
    """Settles in separate transactions at once: each adds its growth under the row lock."""
    async with PostgresLedger(DSN, schema=schema, pool_max=8) as ledger:
        await ledger.reserve("r0", ["user:a"], AMOUNT, ttl=60)
        await ledger.settle("r0", AMOUNT, record=_context_record(0, 1000, 1000, "conv_x"))
        for n in range(1, 9):
            await ledger.reserve(f"r{n}", ["user:a"], AMOUNT, ttl=60)

        async def turn(n: int) -> None:
            record = _context_record(n, 1000 + n, n, "conv_x")  # each saw 1000, added n
            await ledger.settle(f"r{n}", AMOUNT, record=record)

        async with anyio.create_task_group() as tg:
            for n in range(1, 9):
                tg.start_soon(turn, n)
        assert await ledger.response_context("conv_x", "user:a") == 1000 + sum(range(1, 9))
        assert await ledger.check() == []


async def test_sweep_prunes_expired_contexts_in_batches(schema: str) -> None:
    clock = FakeClock()
    async with PostgresLedger(DSN, schema=schema, clock=clock, sweep_batch=2) as ledger:
        for n in range(5):
            await ledger.reserve(f"r{n}", ["user:a"], AMOUNT, ttl=60)
            await ledger.settle(f"r{n}", AMOUNT, record=_context_record(n, n, 0))
        clock.advance(31 * 24 * 3600)
        assert await ledger.sweep() == 0
        admin: Any = await asyncpg.connect(DSN)
        try:
            left = await admin.fetchval(f'SELECT count(*) FROM "{schema}".response_contexts')
        finally:
            await admin.close()
        assert left == 0


def _usage(request_id: str, input_tokens: int = 10) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        model="m",
        endpoint="chat.completions",
        status="success",
        usage_source="provider",
        user="a",
        input_tokens=input_tokens,
        cost=AMOUNT,
    )


async def _settle_grouped(ledger: PostgresLedger, absurd: int, sizes: list[int]) -> list[Any]:
    """16 concurrent settles on one budget (grouped by the combiner), one with 10**30 tokens."""
    for i in range(16):
        await ledger.reserve(f"r{i}", ["user:a"], AMOUNT, ttl=60)
    results: list[Any] = [None] * 16

    async def settle(i: int) -> None:
        record = _usage(f"r{i}", 10**30 if i == absurd else 10)
        try:
            results[i] = await ledger.settle(f"r{i}", AMOUNT, record=record)
        except Exception as exc:
            results[i] = exc

    sizes.clear()
    async with anyio.create_task_group() as tg:
        for i in range(16):
            tg.start_soon(settle, i)
    return results


def _spy_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    run_batch = PostgresLedger._run_batch

    async def spy(self: PostgresLedger, sql: str, batch: list[Any]) -> None:
        sizes.append(len(batch))
        await run_batch(self, sql, batch)

    monkeypatch.setattr(PostgresLedger, "_run_batch", spy)
    return sizes


async def test_an_unstorable_record_is_refused_before_it_joins_a_group(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """10**30 tokens overflow bigint: the settle once failed its whole group."""
    sizes = _spy_batches(monkeypatch)
    async with PostgresLedger(DSN, schema=schema, pool_max=4) as ledger:
        results = await _settle_grouped(ledger, 5, sizes)
        assert max(sizes) > 1, sizes
        assert [type(r).__name__ for r in results] == ["Hold"] * 5 + ["ConfigurationError"] + [
            "Hold"
        ] * 10
        assert "MAX_TOKENS" in str(results[5])
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.spent, status.held) == (AMOUNT * 15, AMOUNT)
        settled = await ledger.settle("r5", AMOUNT, record=_usage("r5"))
        assert settled.state is HoldState.SETTLED
        assert len(await ledger.usage(limit=100)) == 16
        assert await ledger.check() == []


async def test_a_value_the_server_refuses_fails_only_its_operation(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Were an out-of-range value to reach the server, the group is rerun one by one."""
    from gatewaykit.ledger import postgres as postgres_module

    monkeypatch.setattr(postgres_module, "_check_record", lambda record: None)
    sizes = _spy_batches(monkeypatch)
    async with PostgresLedger(DSN, schema=schema, pool_max=4) as ledger:
        results = await _settle_grouped(ledger, 3, sizes)
        assert max(sizes) > 1, sizes
        assert [type(r).__name__ for r in results] == ["Hold"] * 3 + ["LedgerError"] + ["Hold"] * 12
        assert "int64" in str(results[3])
        status = await ledger.status("user:a")
        assert status is not None
        assert (status.spent, status.held) == (AMOUNT * 15, AMOUNT)
        r3 = await ledger.get_hold("r3")
        assert r3 is not None
        assert r3.live
        assert await ledger.check() == []


async def _until(predicate: Any, seconds: float = 10.0) -> None:
    """Poll ``predicate`` until true (fail after ``seconds``)."""
    deadline = time.perf_counter() + seconds
    while not predicate():
        assert time.perf_counter() < deadline, "timed out"
        await anyio.sleep(0.005)


async def test_key_epoch_follows_notifications_and_reconnects(schema: str) -> None:
    async with (
        PostgresLedger(DSN, schema=schema, pool_max=2) as gateway,
        PostgresLedger(DSN, schema=schema, pool_max=2) as cli,
    ):
        start = gateway.key_epoch  # the first read starts listening
        await _until(lambda: gateway.key_epoch > start)  # listening (a bump on connect)
        seen = gateway.key_epoch
        record = ApiKeyRecord(key_id="k1", key_hash="a" * 64, prefix="p", user="u")
        await cli.create_key(record)
        await _until(lambda: gateway.key_epoch > seen)
        seen = gateway.key_epoch
        assert await cli.revoke_key("k1")
        await _until(lambda: gateway.key_epoch > seen)
        # Another schema's keys are not ours.
        before = gateway.key_epoch
        gateway._on_keys(None, 0, "gatewaykit_keys", schema + "_other")
        assert gateway.key_epoch == before
        # A lost listening connection: reconnected, and bumped (changes may be missed).
        conn = await asyncpg.connect(DSN)
        try:
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                f"gatewaykit-keys:{schema}",
            )
        finally:
            await conn.close()
        assert killed == 1
        await _until(lambda: gateway.key_epoch > before)
        seen = gateway.key_epoch
        assert await cli.revoke_key("k1")  # heard on the new connection
        await _until(lambda: gateway.key_epoch > seen)


async def test_key_epoch_counts_own_changes_without_listening(schema: str) -> None:
    async with PostgresLedger(DSN, schema=schema, pool_max=2) as ledger:
        record = ApiKeyRecord(key_id="k1", key_hash="a" * 64, prefix="p", user="u")
        await ledger.create_key(record)
        assert ledger._key_epoch == 1
        assert await ledger.revoke_key("k1")
        assert not await ledger.revoke_key("missing")
        assert ledger._key_epoch == 2
        assert ledger._listener is None  # nobody read key_epoch: no extra connection


# -- usage reports ----------------------------------------------------------------------------


async def test_usage_reports_are_bounded_by_report_timeout_not_command_timeout(
    schema: str,
) -> None:
    """A report over many rows may outlast a request's statement budget; here a lock held
    for 1.5 s stands in for a long scan."""
    async with PostgresLedger(DSN, schema=schema, command_timeout=0.5) as ledger:
        await ledger.usage()  # migrated
    blocker: Any = await asyncpg.connect(DSN)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute(f'LOCK TABLE "{schema}".usage_records IN ACCESS EXCLUSIVE MODE')
        async with PostgresLedger(
            DSN, schema=schema, command_timeout=0.5, report_timeout=0.5
        ) as strict:
            with pytest.raises(LedgerUnavailableError):
                await strict.usage_totals(group_by=("day",))
        answers: list[Any] = []
        async with PostgresLedger(
            DSN, schema=schema, command_timeout=0.5, report_timeout=30
        ) as patient:

            async def report() -> None:
                answers.append(await patient.usage_totals(group_by=("day",)))

            async with anyio.create_task_group() as tg:
                tg.start_soon(report)
                await anyio.sleep(1.5)  # past command_timeout, the report still waits
                assert answers == []
                await blocker.execute("COMMIT")  # releases the lock
        assert answers == [[]]
    finally:
        await blocker.close()
