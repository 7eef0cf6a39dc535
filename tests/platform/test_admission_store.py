"""Open admissions in the outbox's store (AdmissionStore), run against every backend.

An admission is written before a request goes upstream; its report is queued and the
admission closed in one transaction; admissions a dead process left open become reports,
exactly once, whoever recovers them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox import Admission, AdmissionStore, Outbox, SQLiteOutbox

from .conftest import OutboxFactory

pytestmark = pytest.mark.anyio

DETAILS = {"attempt_ids": ["att_1", "att_2"], "model": "m", "endpoint": "chat.completions"}


def report(request_id: str, status: str = "success") -> tuple[str, dict[str, Any]]:
    body = {"request_id": request_id, "attempt_id": "att_1", "status": status}
    return f"{request_id}:att_1", body


def recovered(admission: Admission) -> tuple[str, Mapping[str, Any]]:
    first = admission.details["attempt_ids"][0]
    return f"{admission.request_id}:{first}", {
        "request_id": admission.request_id,
        "attempt_id": first,
        "status": "incomplete",
        "owner": admission.owner,
    }


def store(outbox: Outbox) -> AdmissionStore:
    assert isinstance(outbox, AdmissionStore)
    return outbox


async def payloads(outbox: Outbox) -> dict[str, Mapping[str, Any]]:
    return {item.key: item.payload for item in await outbox.claim(limit=1000, lease=0)}


async def test_backends_keep_admissions(outbox: Outbox) -> None:
    admissions = store(outbox)
    assert await admissions.admit("r1", DETAILS, owner="gw-a")
    assert not await admissions.admit("r1", {**DETAILS, "model": "other"}, owner="gw-b")
    [open_one] = await admissions.admissions()
    assert (open_one.request_id, open_one.owner, dict(open_one.details)) == ("r1", "gw-a", DETAILS)
    assert open_one.admitted_at.tzinfo is not None
    assert await admissions.admission_count() == 1
    assert await outbox.size() == 0  # an admission is not a report


async def test_complete_queues_the_report_and_closes_the_admission_together(
    outbox: Outbox,
) -> None:
    admissions = store(outbox)
    await admissions.admit("r1", DETAILS, owner="gw-a")
    assert await admissions.complete("r1", *report("r1"))
    assert await admissions.admission_count() == 0
    assert await payloads(outbox) == {"r1:att_1": report("r1")[1]}
    # Closed: a second settlement of the same request writes nothing.
    assert not await admissions.complete("r1", *report("r1", "error"))
    # No admission at all: nothing is queued either (the caller uses enqueue for that).
    assert not await admissions.complete("r9", *report("r9"))
    assert await outbox.size() == 1


async def test_a_dead_owners_admissions_become_reports_once(outbox: Outbox) -> None:
    admissions = store(outbox)
    await admissions.heartbeat("gw-dead")
    await admissions.heartbeat("gw-live")
    for n in range(3):
        await admissions.admit(f"dead{n}", DETAILS, owner="gw-dead")
    await admissions.admit("live0", DETAILS, owner="gw-live")
    assert await admissions.recover(recovered, stale_after=30) == []  # everyone is fresh
    await anyio.sleep(0.3)
    await admissions.heartbeat("gw-live")  # only gw-live is still beating
    keys = await admissions.recover(recovered, stale_after=0.2)
    assert sorted(keys) == ["dead0:att_1", "dead1:att_1", "dead2:att_1"]
    assert await admissions.recover(recovered, stale_after=0.2) == []  # exactly once
    assert [a.request_id for a in await admissions.admissions()] == ["live0"]
    queued = await payloads(outbox)
    assert queued["dead1:att_1"]["status"] == "incomplete"
    assert queued["dead1:att_1"]["owner"] == "gw-dead"
    # The dead owner, had it been only stalled, finds its admission closed: no second report.
    assert not await admissions.complete("dead1", *report("dead1"))
    assert (await payloads(outbox))["dead1:att_1"]["status"] == "incomplete"
    # The live one settles normally.
    assert await admissions.complete("live0", *report("live0"))


async def test_an_owner_takes_its_own_admissions_at_once(outbox: Outbox) -> None:
    admissions = store(outbox)
    await admissions.heartbeat("gw-a")
    await admissions.admit("r1", DETAILS, owner="gw-a")
    await admissions.admit("r2", DETAILS, owner="gw-b")
    await admissions.heartbeat("gw-b")
    assert await admissions.recover(recovered, stale_after=60, owner="gw-a") == ["r1:att_1"]
    assert [a.request_id for a in await admissions.admissions()] == ["r2"]


async def test_an_owner_without_heartbeat_is_stale_after_the_lease_since_admission(
    outbox: Outbox,
) -> None:
    admissions = store(outbox)
    await admissions.admit("r1", DETAILS, owner="never-beat")
    assert await admissions.recover(recovered, stale_after=30) == []
    await anyio.sleep(0.25)
    assert await admissions.recover(recovered, stale_after=0.2) == ["r1:att_1"]


async def test_stale_instances_are_forgotten_and_retire_forgets_at_once(outbox: Outbox) -> None:
    admissions = store(outbox)
    await admissions.heartbeat("gw-old")
    await admissions.heartbeat("gw-going")
    await admissions.retire("gw-going")
    await anyio.sleep(0.25)
    await admissions.heartbeat("gw-new")
    await admissions.recover(recovered, stale_after=0.2)
    # gw-old had nothing open: its row is gone. Admitting under it again is stale at once.
    await admissions.admit("r1", DETAILS, owner="gw-old")
    await admissions.admit("r2", DETAILS, owner="gw-new")
    await anyio.sleep(0.25)
    await admissions.heartbeat("gw-new")
    assert await admissions.recover(recovered, stale_after=0.2) == ["r1:att_1"]


async def test_two_processes_recovering_at_once_split_the_admissions(
    outbox_factory: OutboxFactory,
) -> None:
    async with outbox_factory() as a, outbox_factory() as b:
        for n in range(60):
            await store(a).admit(f"r{n}", DETAILS, owner="gw-dead")
        await anyio.sleep(0.25)
        taken: list[str] = []

        async def sweep(box: Outbox) -> None:
            for _ in range(5):
                taken.extend(await store(box).recover(recovered, stale_after=0.2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(sweep, a)
            tg.start_soon(sweep, b)
        assert sorted(taken) == sorted(f"r{n}:att_1" for n in range(60))
        assert await a.size() == 60


async def test_settlements_racing_a_recovery_give_one_report_each(
    outbox_factory: OutboxFactory,
) -> None:
    """An owner that stalled past its lease settles while another process recovers it:
    each request ends with exactly one report, either its own or the recovered one."""
    async with outbox_factory() as owner, outbox_factory() as other:
        count = 80
        for n in range(count):
            await store(owner).admit(f"r{n}", DETAILS, owner="gw-stalled")
        await anyio.sleep(0.25)
        completed: list[str] = []
        recovered_keys: list[str] = []

        async def settle(n: int) -> None:
            await anyio.sleep(n * 0.001)  # spread out, so the recovery lands among them
            if await store(owner).complete(f"r{n}", *report(f"r{n}")):
                completed.append(f"r{n}")

        async def recover() -> None:
            await anyio.sleep(0.04)
            for _ in range(3):
                recovered_keys.extend(await store(other).recover(recovered, stale_after=0.2))

        async with anyio.create_task_group() as tg:
            tg.start_soon(recover)
            for n in range(count):
                tg.start_soon(settle, n)
        assert await store(owner).admission_count() == 0
        queued = await payloads(owner)
        assert len(queued) == count  # one per request (both kinds share the key here)
        by_status = {
            status: sorted(k for k, p in queued.items() if p["status"] == status)
            for status in ("success", "incomplete")
        }
        assert by_status["success"] == sorted(f"{r}:att_1" for r in completed)
        assert by_status["incomplete"] == sorted(recovered_keys)


async def test_admissions_and_reports_share_group_commits(outbox: Outbox) -> None:
    admissions = store(outbox)

    async def request(n: int) -> None:
        assert await admissions.admit(f"r{n}", DETAILS, owner="gw-a")
        await anyio.lowlevel.checkpoint()
        assert await admissions.complete(f"r{n}", *report(f"r{n}"))

    async def plain(n: int) -> None:
        assert await outbox.enqueue(f"p{n}:x", {"n": n})

    async with anyio.create_task_group() as tg:
        for n in range(200):
            tg.start_soon(request, n)
            tg.start_soon(plain, n)
    assert await admissions.admission_count() == 0
    assert await outbox.size() == 400


async def test_a_failing_close_queues_no_report(tmp_path: Path) -> None:
    """The report and the closing of its admission commit together or not at all."""
    import sqlite3

    async with SQLiteOutbox(str(tmp_path / "o.db")) as box:
        await box.admit("r1", DETAILS, owner="gw")
        await box.admit("r2", DETAILS, owner="gw")
        await box._write(
            "CREATE TRIGGER no_close BEFORE DELETE ON gatewaykit_outbox_admissions "
            "WHEN old.request_id = 'r1' BEGIN SELECT RAISE(ABORT, 'refused'); END",
            (),
        )
        results: dict[str, object] = {}

        async def settle(request_id: str) -> None:
            try:
                results[request_id] = await box.complete(request_id, *report(request_id))
            except sqlite3.IntegrityError as exc:
                results[request_id] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(settle, "r1")
            tg.start_soon(settle, "r2")
        assert isinstance(results["r1"], sqlite3.IntegrityError)
        assert results["r2"] is True  # the other write in the batch is unharmed
        assert set(await payloads(box)) == {"r2:att_1"}  # r1's report rolled back with it
        assert [a.request_id for a in await box.admissions()] == ["r1"]


def test_table_names_leave_room_for_the_admission_tables() -> None:
    SQLiteOutbox("x.db", table="t" * 52)
    with pytest.raises(ConfigurationError, match="too long"):
        SQLiteOutbox("x.db", table="t" * 53)
