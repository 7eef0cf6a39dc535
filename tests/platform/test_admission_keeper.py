"""AdmissionKeeper: heart-beats for its process, recovers what dead processes left open."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox import Admission, AdmissionKeeper, AdmissionStore, Outbox, SQLiteOutbox
from gatewaykit.outbox.admissions import RecoveryCause

from .conftest import OutboxFactory, until

pytestmark = pytest.mark.anyio

DETAILS = {"attempt_ids": ["att_1"], "model": "m", "endpoint": "chat.completions"}


def build(admission: Admission, cause: RecoveryCause) -> tuple[str, Mapping[str, Any]]:
    return f"{admission.request_id}:att_1", {"owner": admission.owner, "cause": cause}


def store(outbox: Outbox) -> AdmissionStore:
    assert isinstance(outbox, AdmissionStore)
    return outbox


async def queued(outbox: Outbox) -> dict[str, Mapping[str, Any]]:
    return {item.key: item.payload for item in await outbox.claim(limit=1000, lease=0)}


async def test_stopping_reports_its_own_open_admissions_as_shutdown(outbox: Outbox) -> None:
    woken: list[list[str]] = []
    keeper = AdmissionKeeper(store(outbox), report=build, lease=30, on_recovered=woken.append)
    async with keeper:
        me = keeper.instance_id
        assert me
        assert await keeper.admit("r1", DETAILS)
        assert await keeper.admit("r2", DETAILS)
        assert await store(outbox).complete("r2", "r2:att_1", {"status": "success"})
    assert await queued(outbox) == {
        "r1:att_1": {"owner": me, "cause": "shutdown"},
        "r2:att_1": {"status": "success"},
    }
    assert woken == [["r1:att_1"]]
    assert keeper.recovered == 1
    async with keeper:
        assert keeper.instance_id != me  # a fresh random id per start


async def test_a_dead_process_is_recovered_by_a_live_one_after_the_lease(
    outbox_factory: OutboxFactory,
) -> None:
    async with outbox_factory() as dead_box, outbox_factory() as live_box:
        await store(dead_box).heartbeat("gw-dead")
        for n in range(3):
            await store(dead_box).admit(f"r{n}", DETAILS, owner="gw-dead")
        keeper = AdmissionKeeper(store(live_box), report=build, lease=0.3)
        async with keeper:
            assert await keeper.admit("mine", DETAILS)

            async def recovered() -> bool:
                return await store(live_box).admission_count() == 1

            await until(recovered, within=5)
            await anyio.sleep(1.0)  # several leases: its own admission is never taken
            [left] = await store(live_box).admissions()
            assert left.request_id == "mine"
            assert await store(live_box).complete("mine", "mine:att_1", {"status": "success"})
        got = await queued(live_box)
        assert {k: v["cause"] for k, v in got.items() if k != "mine:att_1"} == {
            f"r{n}:att_1": "crash" for n in range(3)
        }
        assert keeper.recovered == 3


async def test_a_stable_instance_id_recovers_its_previous_run_at_once(outbox: Outbox) -> None:
    await store(outbox).heartbeat("gw-7")
    await store(outbox).admit("r1", DETAILS, owner="gw-7")  # the previous run, killed
    async with AdmissionKeeper(store(outbox), report=build, instance_id="gw-7", lease=60) as k:
        assert k.instance_id == "gw-7"
        assert await store(outbox).admission_count() == 0
    assert await queued(outbox) == {"r1:att_1": {"owner": "gw-7", "cause": "crash"}}


async def test_a_store_failure_is_logged_not_raised(
    outbox_factory: OutboxFactory, caplog: pytest.LogCaptureFixture
) -> None:
    box = outbox_factory()  # never opened: every call fails
    async with AdmissionKeeper(store(box), report=build, lease=0.15):
        await anyio.sleep(0.2)
    assert "heartbeat of instance" in caplog.text
    assert "could not recover open admissions" in caplog.text


def test_configuration_errors() -> None:
    box = SQLiteOutbox(":memory:")
    for bad in ({"lease": 0}, {"instance_id": ""}, {"instance_id": "x" * 256}):
        with pytest.raises(ConfigurationError):
            AdmissionKeeper(box, report=build, **bad)
