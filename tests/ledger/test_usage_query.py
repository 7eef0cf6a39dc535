"""Conformance of the usage listing and totals (``Ledger.usage`` / ``usage_totals``).

Every test runs on every registered backend. The clock starts on 2026-01-15 12:00 UTC;
records are written by settles and releases at chosen store times.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import Ledger, UsageRecord, UsageTotal
from tests.ledger.backends import FakeClock

pytestmark = pytest.mark.anyio

D = Decimal
UTC = timezone.utc


def utc(day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    return datetime(2026, 1, day, hour, minute, sec, tzinfo=UTC)


async def write(
    ledger: Ledger,
    clock: FakeClock,
    request_id: str,
    *,
    at: datetime,
    user: str | None = "alice",
    key: str | None = "k1",
    model: str = "gpt-4o",
    cost: str = "0.25",
    tokens: tuple[int, int, int, int] = (10, 20, 3, 4),
    status: str = "success",
    source: str = "provider",
    latency_ms: int | None = 120,
) -> None:
    """Charge one request at store time ``at`` (a release when the cost is 0)."""
    clock.advance((at - datetime.fromtimestamp(clock.t, UTC)).total_seconds())
    record = UsageRecord(
        request_id=request_id,
        model=model,
        endpoint="/v1/chat/completions",
        status=status,
        usage_source=source,
        key_id=key,
        user=user,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_read_tokens=tokens[2],
        cache_write_tokens=tokens[3],
        cost=D(cost),
        latency_ms=latency_ms,
    )
    await ledger.reserve(request_id, [f"user:{user or 'anon'}"], D(1), ttl=60)
    if D(cost):
        await ledger.settle(request_id, D(cost), record=record)
    else:
        await ledger.release(request_id, record=record)


async def fill(ledger: Ledger, clock: FakeClock) -> None:
    """Five records over two UTC days, three users, two keys, two models."""
    await write(ledger, clock, "r1", at=utc(15, 12), cost="0.25")
    await write(ledger, clock, "r2", at=utc(15, 18), user="bob", key="k2", model="claude")
    await write(ledger, clock, "r3", at=utc(15, 23, 59, 59), model="claude", cost="0.000000001")
    await write(
        ledger, clock, "r4", at=utc(16, 0), cost="0", status="error", source="none", latency_ms=None
    )
    await write(ledger, clock, "r5", at=utc(16, 6), user=None, key=None, cost="1.5")


def ids(rows: list[UsageRecord]) -> list[str]:
    return [r.request_id for r in rows]


async def test_rows_carry_time_latency_tokens_cost_source_and_status(
    ledger: Ledger, clock: FakeClock
) -> None:
    await fill(ledger, clock)
    rows = await ledger.usage()
    assert ids(rows) == ["r5", "r4", "r3", "r2", "r1"]  # newest first
    r3, r4 = rows[2], rows[1]
    assert r3.created_at == utc(15, 23, 59, 59)
    assert (r3.latency_ms, r3.status, r3.usage_source) == (120, "success", "provider")
    assert (r3.input_tokens, r3.output_tokens, r3.cache_read_tokens, r3.cache_write_tokens) == (
        10,
        20,
        3,
        4,
    )
    assert r3.cost == D("0.000000001")
    assert (r4.latency_ms, r4.status, r4.usage_source, r4.cost) == (None, "error", "none", D(0))


async def test_filters_match_exactly_and_combine(ledger: Ledger, clock: FakeClock) -> None:
    await fill(ledger, clock)
    assert ids(await ledger.usage(user="alice")) == ["r4", "r3", "r1"]
    assert ids(await ledger.usage(user="ali")) == []
    assert ids(await ledger.usage(key="k2")) == ["r2"]
    assert ids(await ledger.usage(model="claude")) == ["r3", "r2"]
    assert ids(await ledger.usage(user="alice", model="claude")) == ["r3"]
    assert ids(await ledger.usage(user="alice", key="k2")) == []
    assert ids(await ledger.usage(user="alice", limit=2)) == ["r4", "r3"]


async def test_since_is_inclusive_and_until_exclusive(ledger: Ledger, clock: FakeClock) -> None:
    await fill(ledger, clock)
    assert ids(await ledger.usage(since=utc(15, 18))) == ["r5", "r4", "r3", "r2"]
    assert ids(await ledger.usage(until=utc(15, 18))) == ["r1"]
    assert ids(await ledger.usage(since=utc(15, 18), until=utc(16))) == ["r3", "r2"]
    assert ids(await ledger.usage(since=utc(16), until=utc(16))) == []
    # Any time zone: 01:00 at +01:00 is midnight UTC.
    paris = timezone(timedelta(hours=1))
    since = datetime(2026, 1, 16, 1, tzinfo=paris)
    assert ids(await ledger.usage(since=since)) == ["r5", "r4"]
    # Consecutive ranges never count a record twice nor lose one.
    day1 = await ledger.usage_totals(group_by=(), since=utc(15), until=utc(16))
    day2 = await ledger.usage_totals(group_by=(), since=utc(16), until=utc(17))
    assert day1[0].requests + day2[0].requests == 5


async def test_totals_per_day_and_model_in_utc(ledger: Ledger, clock: FakeClock) -> None:
    await fill(ledger, clock)
    totals = await ledger.usage_totals(group_by=("day", "model"))
    assert totals == [
        UsageTotal((date(2026, 1, 15), "claude"), 2, 20, 40, 6, 8, D("0.250000001")),
        UsageTotal((date(2026, 1, 15), "gpt-4o"), 1, 10, 20, 3, 4, D("0.25")),
        UsageTotal((date(2026, 1, 16), "gpt-4o"), 2, 20, 40, 6, 8, D("1.5")),
    ]
    assert all(isinstance(t.cost, Decimal) for t in totals)
    by_model_day = await ledger.usage_totals(group_by=["model", "day"], model="gpt-4o")
    assert [t.group for t in by_model_day] == [
        ("gpt-4o", date(2026, 1, 15)),
        ("gpt-4o", date(2026, 1, 16)),
    ]


async def test_totals_per_user_and_key_put_none_last(ledger: Ledger, clock: FakeClock) -> None:
    await fill(ledger, clock)
    users = await ledger.usage_totals(group_by=("user",))
    assert [(t.group, t.requests, t.cost) for t in users] == [
        (("alice",), 3, D("0.250000001")),
        (("bob",), 1, D("0.25")),
        ((None,), 1, D("1.5")),
    ]
    keys = await ledger.usage_totals(group_by=("key", "user"), since=utc(15, 18))
    assert [(t.group, t.requests) for t in keys] == [
        (("k1", "alice"), 2),
        (("k2", "bob"), 1),
        ((None, None), 1),
    ]


async def test_grand_total_and_filtered_totals(ledger: Ledger, clock: FakeClock) -> None:
    await fill(ledger, clock)
    (total,) = await ledger.usage_totals(group_by=())
    assert total == UsageTotal((), 5, 50, 100, 15, 20, D("2.000000001"))
    (alice,) = await ledger.usage_totals(group_by=("user",), user="alice", until=utc(16))
    assert (alice.requests, alice.cost) == (2, D("0.250000001"))


async def test_empty_results(ledger: Ledger, clock: FakeClock) -> None:
    assert await ledger.usage() == []
    assert await ledger.usage_totals(group_by=()) == []
    assert await ledger.usage_totals(group_by=("day", "model")) == []
    await fill(ledger, clock)
    assert await ledger.usage(model="nope") == []
    assert await ledger.usage_totals(group_by=(), user="nobody") == []
    assert await ledger.usage_totals(group_by=("day",), since=utc(17)) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"since": datetime(2026, 1, 15)},  # naive: which zone?
        {"until": "2026-01-15T00:00:00Z"},
        {"since": utc(16), "until": utc(15)},
        {"user": 1},
        {"limit": 0},
        {"limit": True},
    ],
)
async def test_bad_listing_arguments_are_refused(ledger: Ledger, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        await ledger.usage(**kwargs)


@pytest.mark.parametrize(
    "group_by", [("week",), ("day", "day"), "model", ("user", "team")], ids=repr
)
async def test_bad_groups_are_refused(ledger: Ledger, group_by: Any) -> None:
    with pytest.raises(ConfigurationError, match="group"):
        await ledger.usage_totals(group_by=group_by)


async def test_naive_bounds_are_refused_by_totals(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        await ledger.usage_totals(group_by=("day",), until=datetime(2026, 1, 15))
