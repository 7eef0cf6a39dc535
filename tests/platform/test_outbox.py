"""The Outbox contract, run against every backend (SQLite file, PostgreSQL table)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox import Outbox, SQLiteOutbox, open_outbox
from tests.ledger.backends import FakeClock

from .conftest import OutboxFactory

pytestmark = pytest.mark.anyio

REPORT = {"request_id": "r1", "attempt_id": "a1", "status": "success", "usage": None}


async def test_backends_implement_the_protocol(outbox: Outbox) -> None:
    assert isinstance(outbox, Outbox)
    assert outbox.is_open


async def test_enqueue_is_idempotent_by_key(outbox: Outbox) -> None:
    assert await outbox.enqueue("r1:a1", REPORT)
    assert not await outbox.enqueue("r1:a1", {**REPORT, "status": "error"})
    assert await outbox.size() == 1
    [item] = await outbox.claim(limit=10, lease=30)
    assert item.key == "r1:a1"
    assert item.payload == REPORT  # the first report wins
    assert item.attempts == 0
    assert item.last_error is None


async def test_claim_leases_items_and_ack_removes_them(outbox: Outbox) -> None:
    for n in range(5):
        await outbox.enqueue(f"r{n}:a", {**REPORT, "request_id": f"r{n}"})
    first = await outbox.claim(limit=3, lease=30)
    assert [item.key for item in first] == ["r0:a", "r1:a", "r2:a"]  # oldest first
    second = await outbox.claim(limit=10, lease=30)
    assert [item.key for item in second] == ["r3:a", "r4:a"]  # leased items are hidden
    assert await outbox.claim(limit=10, lease=30) == []
    assert await outbox.size() == 5  # leased is still live
    for item in first + second:
        await outbox.ack(item.key)
    await outbox.ack("never-enqueued")
    assert await outbox.size() == 0
    assert await outbox.oldest_age() is None
    assert await outbox.next_due_in() is None


async def test_a_lapsed_lease_makes_the_item_due_again(outbox_factory: OutboxFactory) -> None:
    clock = FakeClock()
    async with outbox_factory(clock=clock) as outbox:
        await outbox.enqueue("k", REPORT)
        assert len(await outbox.claim(limit=1, lease=30)) == 1
        clock.advance(29.9)
        assert await outbox.claim(limit=1, lease=30) == []
        clock.advance(0.1)  # the lease ends exactly at its length
        assert [item.key for item in await outbox.claim(limit=1, lease=30)] == ["k"]


async def test_retry_later_counts_and_delays(outbox_factory: OutboxFactory) -> None:
    clock = FakeClock()
    async with outbox_factory(clock=clock) as outbox:
        await outbox.enqueue("k", REPORT)
        await outbox.claim(limit=1, lease=30)
        await outbox.retry_later("k", delay=60, error="HTTP 503: down")
        assert await outbox.next_due_in() == pytest.approx(60)
        assert await outbox.claim(limit=1, lease=30) == []
        [item] = await outbox.claim(limit=1, lease=30, due_only=False)
        assert item.attempts == 1
        assert item.last_error == "HTTP 503: down"
        assert await outbox.reschedule_all() == 1
        assert await outbox.next_due_in() == 0


async def test_park_keeps_a_dead_letter_until_requeued(outbox: Outbox) -> None:
    await outbox.enqueue("good", REPORT)
    await outbox.enqueue("bad", REPORT)
    await outbox.park("bad", error="HTTP 422: conflict")
    assert await outbox.size() == 1
    assert await outbox.dead_count() == 1
    [dead] = await outbox.dead_letters()
    assert (dead.key, dead.dead, dead.last_error, dead.attempts) == (
        "bad",
        True,
        "HTTP 422: conflict",
        1,
    )
    claimed = await outbox.claim(limit=10, lease=30, due_only=False)
    assert [item.key for item in claimed] == ["good"]  # dead letters are never sent
    assert await outbox.requeue_dead() == 1
    assert await outbox.dead_count() == 0
    assert await outbox.size() == 2


async def test_oldest_age_grows(outbox_factory: OutboxFactory) -> None:
    clock = FakeClock()
    async with outbox_factory(clock=clock) as outbox:
        await outbox.enqueue("k", REPORT)
        clock.advance(42.5)
        assert await outbox.oldest_age() == pytest.approx(42.5)


async def test_items_survive_reopening(outbox_factory: OutboxFactory) -> None:
    async with outbox_factory() as first:
        await first.enqueue("k1", REPORT)
        await first.claim(limit=1, lease=300)  # claimed by a process that then "dies"
        await first.enqueue("k2", REPORT)
    async with outbox_factory() as second:
        assert await second.size() == 2
        assert await second.reschedule_all() == 2
        assert {item.key for item in await second.claim(limit=10, lease=30)} == {"k1", "k2"}


async def test_two_outboxes_on_one_store_never_claim_the_same_item(
    outbox_factory: OutboxFactory,
) -> None:
    async with outbox_factory() as a, outbox_factory() as b:
        for n in range(40):
            await a.enqueue(f"k{n}", REPORT)
        claimed: list[str] = []

        async def drain(box: Outbox) -> None:
            while items := await box.claim(limit=3, lease=30):
                claimed.extend(item.key for item in items)

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, a)
            tg.start_soon(drain, b)
        assert sorted(claimed) == sorted(f"k{n}" for n in range(40))


async def test_not_open_is_a_clear_error(tmp_path: Path) -> None:
    box = SQLiteOutbox(str(tmp_path / "x.db"))
    with pytest.raises(ConfigurationError, match="async with"):
        await box.enqueue("k", REPORT)


def test_open_outbox_urls(tmp_path: Path) -> None:
    box = open_outbox(f"sqlite:///{tmp_path}/o.db", table="my_outbox")
    assert isinstance(box, SQLiteOutbox)
    assert box.path == f"{tmp_path}/o.db"
    assert box.table == "my_outbox"
    assert isinstance(open_outbox("sqlite://:memory:"), SQLiteOutbox)
    pg = open_outbox("postgresql://u:pw@h/db")
    assert "pw" not in repr(pg)
    for bad in ("outbox.db", "sqlite://relative.db", "mysql://x/y"):
        with pytest.raises(ConfigurationError):
            open_outbox(bad)
    with pytest.raises(ConfigurationError, match="identifier"):
        SQLiteOutbox("x.db", table="bad; drop")


async def test_concurrent_enqueues_are_group_committed_correctly(outbox: Outbox) -> None:
    results: dict[int, bool] = {}

    async def put(n: int) -> None:
        results[n] = await outbox.enqueue(f"k{n % 150}", {**REPORT, "n": n})

    async with anyio.create_task_group() as tg:
        for n in range(300):
            tg.start_soon(put, n)
    assert sum(results.values()) == 150  # each key stored once, duplicates refused
    assert await outbox.size() == 150
    items = await outbox.claim(limit=500, lease=30)
    for item in items:
        winner = int(item.payload["n"])
        assert results[winner]  # the stored report is the one whose enqueue said True


async def test_a_failing_write_spoils_only_itself(tmp_path: Path) -> None:
    import sqlite3

    async with SQLiteOutbox(str(tmp_path / "o.db")) as box:
        outcomes: list[object] = []

        async def put(n: int) -> None:
            outcomes.append(await box.enqueue(f"k{n}", REPORT))

        async def bad() -> None:
            with pytest.raises(sqlite3.OperationalError):
                await box._write("INSERT INTO no_such_table VALUES (1)", ())

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(put, n)
                if n == 10:
                    tg.start_soon(bad)
        assert outcomes == [True] * 20
        assert await box.size() == 20
