"""Refusal counts per (UTC hour, reason): add_denials / denials / pruning, on every backend."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Protocol, cast

import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import DENIAL_RETENTION, DenialCount, DenialStore, Ledger
from tests.ledger.backends import Backend, FakeClock, Opener


class DenialLedger(Ledger, DenialStore, Protocol):
    """The built-in ledgers: a Ledger that also counts refusals."""


def test_refusal_counts_are_an_optional_capability_of_a_ledger() -> None:
    """A ledger of one's own stays a Ledger without them; both built-in ones have them."""
    from gatewaykit.ledger.postgres import PostgresLedger
    from gatewaykit.ledger.sqlite import SQLiteLedger

    assert not hasattr(Ledger, "add_denials")
    assert not hasattr(Ledger, "denials")
    assert issubclass(SQLiteLedger, DenialStore)
    assert issubclass(PostgresLedger, DenialStore)


pytestmark = pytest.mark.anyio

NOON = datetime(2026, 1, 15, 12, tzinfo=timezone.utc)  # the suite's store clock starts here
HOUR = timedelta(hours=1)


async def test_counts_add_up_per_hour_and_reason(ledger: DenialLedger) -> None:
    assert await ledger.denials(since=NOON - 24 * HOUR) == []
    await ledger.add_denials({(NOON, "auth"): 3, (NOON - HOUR, "budget"): 1})
    await ledger.add_denials({(NOON, "auth"): 2, (NOON, "rate_limit"): 4})
    await ledger.add_denials({})  # nothing to add: no write, no error
    assert await ledger.denials(since=NOON - 24 * HOUR) == [
        DenialCount(NOON - HOUR, "budget", 1),
        DenialCount(NOON, "auth", 5),
        DenialCount(NOON, "rate_limit", 4),
    ]
    # since inclusive, until exclusive, by the hour's start
    assert await ledger.denials(since=NOON) == [
        DenialCount(NOON, "auth", 5),
        DenialCount(NOON, "rate_limit", 4),
    ]
    assert await ledger.denials(since=NOON - HOUR, until=NOON) == [
        DenialCount(NOON - HOUR, "budget", 1)
    ]


async def test_hours_in_other_zones_are_stored_in_utc(ledger: DenialLedger) -> None:
    plus_two = timezone(timedelta(hours=2))
    await ledger.add_denials({(NOON.astimezone(plus_two), "auth"): 1})
    [row] = await ledger.denials(since=NOON.astimezone(plus_two))
    assert row == DenialCount(NOON, "auth", 1)
    assert row.hour.utcoffset() == timedelta(0)


async def test_concurrent_flushes_lose_nothing(backend: Backend, opener: Opener) -> None:
    """Several processes (here: connections) flush into one store at once."""
    if not backend.persistent:
        pytest.skip("each connection to this backend is a store of its own")
    stores = [cast(DenialLedger, opener()) for _ in range(3)]
    for store in stores:
        await store.open()
    try:
        await asyncio.gather(
            *(
                store.add_denials({(NOON, "auth"): 1, (NOON, "budget"): 2})
                for store in stores
                for _ in range(5)
            )
        )
        assert await stores[0].denials(since=NOON) == [
            DenialCount(NOON, "auth", 15),
            DenialCount(NOON, "budget", 30),
        ]
    finally:
        for store in stores:
            await store.aclose()


async def test_sweep_prunes_hours_past_retention(ledger: DenialLedger, clock: FakeClock) -> None:
    old = NOON - timedelta(seconds=DENIAL_RETENTION) - HOUR
    await ledger.add_denials({(old, "auth"): 1, (NOON, "auth"): 1})
    await ledger.sweep()
    assert [d.hour for d in await ledger.denials(since=old)] == [NOON]
    clock.advance(DENIAL_RETENTION + 3600)
    await ledger.sweep()
    assert await ledger.denials(since=old) == []


@pytest.mark.parametrize(
    "counts",
    [
        {(NOON.replace(tzinfo=None), "auth"): 1},  # naive
        {(NOON + timedelta(minutes=1), "auth"): 1},  # not on the hour
        {(NOON, "Auth"): 1},
        {(NOON, ""): 1},
        {(NOON, "a" * 33): 1},
        {(NOON, "auth; DROP TABLE denials"): 1},
        {(NOON, "auth"): 0},
        {(NOON, "auth"): -1},
        {(NOON, "auth"): True},
        {(NOON, "auth"): 2**41},
        {"auth": 1},
        [((NOON, "auth"), 1)],
    ],
)
async def test_bad_counts_are_refused_and_store_nothing(
    ledger: DenialLedger, counts: object
) -> None:
    with pytest.raises(ConfigurationError):
        await ledger.add_denials(counts)  # type: ignore[arg-type]
    assert await ledger.denials(since=NOON - 24 * HOUR) == []


async def test_a_read_needs_aware_times(ledger: DenialLedger) -> None:
    with pytest.raises(ConfigurationError):
        await ledger.denials(since=NOON.replace(tzinfo=None))
    with pytest.raises(ConfigurationError):
        await ledger.denials(since=NOON, until=NOON - HOUR)
    with pytest.raises(ConfigurationError):
        await ledger.denials(since=None)  # type: ignore[arg-type]
