"""The shared conformance suite: every test runs against every backend in BACKENDS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from gatewaykit.errors import (
    BudgetExceeded,
    ConfigurationError,
    HoldClosedError,
    HoldConflictError,
    HoldNotFoundError,
    InvalidAmountError,
    InvalidScopeError,
)
from gatewaykit.ledger.base import (
    MAX_LIMIT,
    ApiKeyRecord,
    HoldState,
    Ledger,
    Period,
    ResponseContext,
    UsageRecord,
)
from gatewaykit.usage import MAX_TOKENS
from tests.ledger.backends import Backend, FakeClock, Opener

pytestmark = pytest.mark.anyio

D = Decimal
Z = Decimal(0)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, sec, tzinfo=timezone.utc)


# -- budgets, periods and windows ----------------------------------------------------------


async def test_budget_crud_and_implicit_scopes(ledger: Ledger) -> None:
    assert await ledger.status("user:alice") is None
    status = await ledger.set_budget("user:alice", limit=D("10"), period=Period("day"))
    assert status.limit == D("10")
    assert status.spent == status.held == 0
    assert status.remaining == D("10")
    assert status.window_start == utc(2026, 1, 15)
    assert status.resets_at == utc(2026, 1, 16)

    await ledger.reserve("r1", ["user:alice", "key:k1"], D("1.5"), ttl=60)
    implicit = await ledger.status("key:k1")  # never configured: counted, unlimited
    assert implicit is not None
    assert implicit.limit is None
    assert implicit.remaining is None
    assert implicit.held == D("1.5")
    assert implicit.period == Period()
    assert [b.scope for b in await ledger.budgets()] == ["key:k1", "user:alice"]

    assert await ledger.delete_budget("user:alice") is True
    assert await ledger.delete_budget("user:alice") is False
    after = await ledger.status("user:alice")
    assert after is not None
    assert after.limit is None
    await ledger.release("r1")


async def test_set_budget_changes_limit_at_once(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("1"))
    await ledger.reserve("r1", ["user:a"], D("1"), ttl=60)
    await ledger.set_budget("user:a", limit=D("2"))
    await ledger.reserve("r2", ["user:a"], D("1"), ttl=60)
    await ledger.set_budget("user:a", limit=None)
    await ledger.reserve("r3", ["user:a"], D("100"), ttl=60)
    status = await ledger.status("user:a")
    assert status is not None
    assert status.held == D("102")


async def test_refusal_carries_details_and_stores_nothing(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("5"), period=Period("day"))
    await ledger.reserve("r1", ["user:a"], D("2"), ttl=60)
    await ledger.settle("r1", D("1"))
    await ledger.reserve("r2", ["user:a"], D("3"), ttl=60)
    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve("r3", ["user:a", "key:x"], D("1.000000001"), ttl=60)
    exc = info.value
    assert (exc.scope, exc.limit, exc.spent, exc.held) == ("user:a", D(5), D(1), D(3))
    assert exc.remaining == D(1)
    assert exc.requested == D("1.000000001")
    assert exc.resets_at == utc(2026, 1, 16)
    assert await ledger.get_hold("r3") is None
    assert await ledger.status("key:x") is None  # all or none: nothing on the other scope
    # A refused id is evaluated afresh: it may be admitted later.
    await ledger.release("r2")
    hold = await ledger.reserve("r3", ["user:a", "key:x"], D("1.000000001"), ttl=60)
    assert hold.live


async def test_all_or_none_across_scopes(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("10"))
    await ledger.set_budget("team:t", limit=D("1"))
    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve("r1", ["user:a", "team:t"], D("2"), ttl=60)
    assert info.value.scope == "team:t"
    status = await ledger.status("user:a")
    assert status is not None
    assert status.held == 0


async def test_reserve_reports_remaining_per_scope(ledger: Ledger, clock: FakeClock) -> None:
    async def remaining_now(scopes: tuple[str, ...]) -> tuple[tuple[str, Decimal | None], ...]:
        statuses = [await ledger.status(scope) for scope in scopes]
        return tuple((s.scope, s.remaining) for s in statuses if s is not None)

    await ledger.set_budget("user:a", limit=D("10"), period=Period("day"))
    await ledger.set_budget("team:t", limit=D("3"))
    await ledger.reserve("old", ["user:a"], D("4"), ttl=60)
    await ledger.settle("old", D("1"))
    await ledger.reserve("due", ["team:t"], D("2"), ttl=5)
    clock.advance(10)  # "due" expired: the next reserve on team:t reclaims it first
    hold = await ledger.reserve("r1", ["user:a", "team:t", "key:k"], D("0.5"), ttl=60)
    assert hold.remaining == (("key:k", None), ("team:t", D("2.5")), ("user:a", D("8.5")))
    assert hold.remaining == await remaining_now(hold.scopes)

    full = await ledger.reserve("r2", ["team:t", "user:a"], D("2.5"), ttl=60)
    assert full.remaining == (("team:t", Z), ("user:a", D(6)))
    assert full.remaining == await remaining_now(full.scopes)
    replay = await ledger.reserve("r1", ["user:a", "team:t", "key:k"], D("0.5"), ttl=60)
    assert replay == hold  # remaining is a snapshot, not part of the hold's identity
    assert replay.remaining in ((), await remaining_now(replay.scopes))

    clock.advance(86_400)  # a new day: user:a's window starts empty, team:t never resets
    await ledger.release("r2")
    fresh = await ledger.reserve("r3", ["user:a", "team:t"], D(1), ttl=60)
    assert fresh.remaining == (("team:t", D(2)), ("user:a", D(9)))
    assert fresh.remaining == await remaining_now(fresh.scopes)


async def test_zero_limit_admits_only_zero(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D(0))
    assert (await ledger.reserve("r0", ["user:a"], D(0), ttl=60)).live
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("r1", ["user:a"], D("0.000000001"), ttl=60)
    await ledger.release("r0")


@pytest.mark.parametrize(
    ("period", "start", "end", "step"),
    [
        (Period("day"), utc(2026, 1, 15), utc(2026, 1, 16), 86_400),
        (Period("week"), utc(2026, 1, 12), utc(2026, 1, 19), 7 * 86_400),
        (Period("month"), utc(2026, 1, 1), utc(2026, 2, 1), 31 * 86_400),
        (Period("rolling", 3600), utc(2026, 1, 15, 12), utc(2026, 1, 15, 13), 3600),
    ],
    ids=["day", "week", "month", "rolling"],
)
async def test_windows_roll_without_reset(
    ledger: Ledger, clock: FakeClock, period: Period, start: datetime, end: datetime, step: int
) -> None:
    await ledger.set_budget("user:a", limit=D("1"), period=period)
    await ledger.reserve("r1", ["user:a"], D("1"), ttl=60)
    await ledger.settle("r1", D("1"))
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.window_start, status.resets_at, status.spent) == (start, end, D(1))
    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve("r2", ["user:a"], D("0.5"), ttl=60)
    assert info.value.resets_at == end
    clock.t = end.timestamp() - 0.000001  # still the old window
    with pytest.raises(BudgetExceeded):
        await ledger.reserve("r2", ["user:a"], D("0.5"), ttl=60)
    clock.t = end.timestamp()
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.window_start, status.spent) == (end, Z)
    assert (await ledger.reserve("r2", ["user:a"], D("1"), ttl=60)).live
    await ledger.release("r2")


async def test_month_window_crosses_year(ledger: Ledger, clock: FakeClock) -> None:
    clock.t = utc(2026, 12, 31, 23, 59, 59).timestamp()
    status = await ledger.set_budget("user:a", limit=D(1), period=Period("month"))
    assert (status.window_start, status.resets_at) == (utc(2026, 12, 1), utc(2027, 1, 1))


async def test_hold_settles_into_the_window_it_was_taken_in(
    ledger: Ledger, clock: FakeClock
) -> None:
    """I10: a hold from the old day settles there; the new day starts clean."""
    await ledger.set_budget("user:a", limit=D("10"), period=Period("day"))
    clock.t = utc(2026, 1, 15, 23, 59, 50).timestamp()
    await ledger.reserve("r1", ["user:a"], D("4"), ttl=60)
    clock.advance(20)  # 00:00:10 the next day
    fresh = await ledger.status("user:a")
    assert fresh is not None
    assert (fresh.window_start, fresh.spent, fresh.held) == (utc(2026, 1, 16), Z, Z)
    await ledger.settle("r1", D("3"))
    fresh = await ledger.status("user:a")
    assert fresh is not None
    assert (fresh.spent, fresh.held) == (Z, Z)
    clock.t = utc(2026, 1, 15, 23, 59, 59).timestamp()  # look back at the old window
    old = await ledger.status("user:a")
    assert old is not None
    assert (old.spent, old.held) == (D(3), Z)


# -- the hold state machine -----------------------------------------------------------------


async def test_partial_settle_releases_the_rest(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("10"))
    await ledger.reserve("r1", ["user:a"], D("4"), ttl=60)
    hold = await ledger.settle("r1", D("1.25"))
    assert hold.state is HoldState.SETTLED
    assert (hold.amount, hold.charged, hold.overrun, hold.late) == (D(4), D("1.25"), Z, False)
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.spent, status.held, status.remaining) == (D("1.25"), Z, D("8.75"))


async def test_overrun_is_charged_and_recorded(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("5"))
    await ledger.reserve("r1", ["user:a"], D("4"), ttl=60)
    hold = await ledger.settle("r1", D("6.5"))
    assert (hold.charged, hold.overrun) == (D("6.5"), D("2.5"))
    status = await ledger.status("user:a")
    assert status is not None
    assert status.spent == D("6.5")
    assert status.remaining == D("-1.5")
    with pytest.raises(BudgetExceeded) as info:
        await ledger.reserve("r2", ["user:a"], D(0), ttl=60)
    assert info.value.remaining == D("-1.5")  # as the status says it: never clamped


async def test_release_refunds(ledger: Ledger) -> None:
    await ledger.reserve("r1", ["user:a"], D("4"), ttl=60)
    hold = await ledger.release("r1")
    assert hold.state is HoldState.RELEASED
    assert hold.charged == 0
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.spent, status.held) == (Z, Z)


async def test_late_charge_after_expiry(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.set_budget("user:a", limit=D("10"))
    await ledger.reserve("r1", ["user:a"], D("4"), ttl=30)
    clock.advance(30)
    assert await ledger.sweep() == 1
    expired = await ledger.get_hold("r1")
    assert expired is not None
    assert expired.state is HoldState.EXPIRED
    hold = await ledger.settle("r1", D("5"))
    assert (hold.state, hold.late, hold.charged, hold.overrun) == (
        HoldState.SETTLED,
        True,
        D(5),
        D(1),
    )
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.spent, status.held) == (D(5), Z)
    assert (await ledger.settle("r1", D("5"))) == hold  # replay


async def test_settle_past_ttl_without_sweep_is_late(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.reserve("r1", ["user:a"], D("4"), ttl=30)
    clock.advance(31)
    hold = await ledger.settle("r1", D("2"))
    assert hold.late
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.spent, status.held) == (D(2), Z)


async def test_release_of_expired_hold_returns_it(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.reserve("r1", ["user:a"], D("4"), ttl=30)
    clock.advance(30)
    hold = await ledger.release("r1")
    assert hold.state is HoldState.EXPIRED
    assert (await ledger.status("user:a")).held == 0  # type: ignore[union-attr]


async def test_tombstone_blocks_a_late_reserve(ledger: Ledger) -> None:
    """F8: the release arrives first; the late reserve must not create a live hold."""
    tomb = await ledger.release("r1")
    assert tomb.state is HoldState.RELEASED
    assert (tomb.scopes, tomb.amount) == ((), Z)
    hold = await ledger.reserve("r1", ["user:a"], D("3"), ttl=60)
    assert hold == tomb
    assert not hold.live
    assert await ledger.holds() == []
    assert await ledger.status("user:a") is None
    assert await ledger.settle("r1", D("1")) == tomb


async def test_replays_and_conflicts(ledger: Ledger, clock: FakeClock) -> None:
    first = await ledger.reserve("r1", ["user:a", "key:k"], D("2"), ttl=60)
    clock.advance(1)
    assert await ledger.reserve("r1", ["key:k", "user:a", "key:k"], D("2.0"), ttl=5) == first
    with pytest.raises(HoldConflictError):
        await ledger.reserve("r1", ["user:a", "key:k"], D("3"), ttl=60)
    with pytest.raises(HoldConflictError):
        await ledger.reserve("r1", ["user:a"], D("2"), ttl=60)
    settled = await ledger.settle("r1", D("1"))
    assert await ledger.settle("r1", D("1")) == settled
    with pytest.raises(HoldConflictError):
        await ledger.settle("r1", D("1.5"))
    assert await ledger.release("r1") == settled  # first terminal transition wins
    assert await ledger.reserve("r1", ["user:a", "key:k"], D("2"), ttl=60) == settled
    with pytest.raises(HoldClosedError):
        await ledger.extend("r1", ttl=60)
    released = await ledger.reserve("r2", ["user:a"], D("2"), ttl=60)
    released = await ledger.release("r2")
    assert await ledger.settle("r2", D("2")) == released
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.spent, status.held) == (D(1), Z)


async def test_unknown_holds(ledger: Ledger) -> None:
    assert await ledger.get_hold("nope") is None
    with pytest.raises(HoldNotFoundError):
        await ledger.settle("nope", D(1))
    with pytest.raises(HoldNotFoundError):
        await ledger.extend("nope", ttl=10)


async def test_extend_keeps_a_hold_alive(ledger: Ledger, clock: FakeClock) -> None:
    """F10: heartbeats carry a hold past its first TTL; without them it expires, never early."""
    await ledger.reserve("long", ["user:a"], D("1"), ttl=30)
    await ledger.reserve("short", ["user:a"], D("1"), ttl=30)
    for _ in range(5):
        clock.advance(20)
        extended = await ledger.extend("long", ttl=30)
        assert extended.live
        assert await ledger.sweep() == (1 if _ == 1 else 0)
    short = await ledger.get_hold("short")
    assert short is not None
    assert short.state is HoldState.EXPIRED
    long = await ledger.settle("long", D("1"))
    assert not long.late
    assert long.created_at.timestamp() + 100 < long.expires_at.timestamp()


async def test_expiry_is_never_early(ledger: Ledger, clock: FakeClock) -> None:
    hold = await ledger.reserve("r1", ["user:a"], D("1"), ttl=30)
    clock.advance(10)
    assert (await ledger.extend("r1", ttl=1)).expires_at == hold.expires_at  # never shortened
    clock.advance(19.999999)
    assert await ledger.sweep() == 0
    clock.advance(0.000001)
    assert await ledger.sweep() == 1
    with pytest.raises(HoldClosedError):
        await ledger.extend("r1", ttl=30)


async def test_reserve_reclaims_expired_holds_on_its_scopes(
    ledger: Ledger, clock: FakeClock
) -> None:
    await ledger.set_budget("user:a", limit=D("1"))
    await ledger.reserve("dead", ["user:a", "key:k"], D("1"), ttl=10)
    await ledger.reserve("other", ["user:b"], D("1"), ttl=10)
    clock.advance(10)
    hold = await ledger.reserve("next", ["user:a"], D("1"), ttl=10)
    assert hold.live
    dead = await ledger.get_hold("dead")
    assert dead is not None
    assert dead.state is HoldState.EXPIRED
    other = await ledger.get_hold("other")
    assert other is not None
    assert other.state is HoldState.HELD  # not on these scopes: left to the sweeper
    assert (await ledger.status("key:k")).held == 0  # type: ignore[union-attr]
    assert await ledger.sweep() == 1


async def test_holds_listing(ledger: Ledger, clock: FakeClock) -> None:
    for i in range(3):
        await ledger.reserve(f"r{i}", ["user:a"], D(1), ttl=60)
        clock.advance(1)
    await ledger.settle("r1", D(1))
    assert [h.hold_id for h in await ledger.holds()] == ["r2", "r0"]
    assert [h.hold_id for h in await ledger.holds(live_only=False)] == ["r2", "r1", "r0"]
    assert [h.hold_id for h in await ledger.holds(live_only=False, limit=1)] == ["r2"]
    await ledger.release("r0")
    await ledger.release("r2")


@pytest.mark.parametrize("limit", [0, -1, True, 1.5, 2**63, 10**30])
async def test_listing_limits_are_validated_before_the_store(ledger: Ledger, limit: int) -> None:
    """A limit no database column can take is a ConfigurationError, not a store failure."""
    with pytest.raises(ConfigurationError, match="limit must be an int from 1 to"):
        await ledger.usage(limit=limit)
    with pytest.raises(ConfigurationError, match="limit must be an int from 1 to"):
        await ledger.holds(limit=limit)
    assert await ledger.usage(limit=MAX_LIMIT) == []


async def test_times_come_from_the_store_clock(ledger: Ledger, clock: FakeClock) -> None:
    hold = await ledger.reserve("r1", ["user:a"], D(1), ttl=90)
    assert hold.created_at == utc(2026, 1, 15, 12)
    assert hold.expires_at == utc(2026, 1, 15, 12, 1, 30)
    await ledger.release("r1")


# -- concurrency ------------------------------------------------------------------------------


async def test_f1_concurrent_reserves_admit_exactly_k(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("0.37"))
    results = await asyncio.gather(
        *(ledger.reserve(f"r{i}", ["user:a"], D("0.01"), ttl=60) for i in range(200)),
        return_exceptions=True,
    )
    admitted = [r.hold_id for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(admitted) == 37
    assert all(isinstance(r, BudgetExceeded) for r in refused)
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.held, status.remaining) == (D("0.37"), Z)
    await asyncio.gather(
        *(
            ledger.settle(h, D("0.005")) if i % 2 else ledger.release(h)
            for i, h in enumerate(admitted)
        )
    )
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.held, status.spent) == (Z, D("0.005") * 18)


async def test_f7_two_settlement_sites_race(ledger: Ledger) -> None:
    for i in range(20):
        await ledger.reserve(f"r{i}", ["user:a"], D(1), ttl=60)
    pairs = await asyncio.gather(
        *(
            asyncio.gather(ledger.settle(f"r{i}", D("0.5")), ledger.release(f"r{i}"))
            for i in range(20)
        )
    )
    settled = 0
    for first, second in pairs:
        assert first == second  # both sites observe the one terminal outcome
        settled += first.state is HoldState.SETTLED
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.held, status.spent) == (Z, D("0.5") * settled)


async def test_f17_replay_storm(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D(5))
    replies = await asyncio.gather(
        *(ledger.reserve("same", ["user:a"], D(1), ttl=60) for _ in range(100))
    )
    assert all(r == replies[0] for r in replies)
    assert [h.hold_id for h in await ledger.holds()] == ["same"]
    status = await ledger.status("user:a")
    assert status is not None
    assert status.held == D(1)
    settles = await asyncio.gather(*(ledger.settle("same", D(1)) for _ in range(100)))
    assert all(s == settles[0] for s in settles)
    status = await ledger.status("user:a")
    assert status is not None
    assert (status.held, status.spent) == (Z, D(1))


POINTS = ["before-reserve", "in-reserve", "between", "in-settle", "after-settle"]


@pytest.mark.parametrize("point", POINTS)
async def test_f2_cancellation_at_every_await_leaves_no_live_hold(
    ledger: Ledger, clock: FakeClock, point: str
) -> None:
    """Cancel a reserve→settle task at each of its awaits; after a sweep nothing is live.

    A cancelled in-flight call may still commit (a "ghost" hold): the TTL and the sweep
    (or the next reserve's reclaim) are the backstop, exactly as in production.
    """
    await ledger.set_budget("user:a", limit=D(1000))
    reached = asyncio.Event()

    async def checkpoint(name: str) -> None:
        if name == point:
            reached.set()
            if not name.startswith("in-"):
                await asyncio.Event().wait()  # parked here until cancelled

    async def lifecycle() -> None:
        await checkpoint("before-reserve")
        await checkpoint("in-reserve")
        await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
        await checkpoint("between")
        await checkpoint("in-settle")
        await ledger.settle("r1", D("0.5"))
        await checkpoint("after-settle")

    task = asyncio.ensure_future(lifecycle())
    await reached.wait()
    if point.startswith("in-"):
        # Cancelled while the call is in flight (a backend without real awaits finishes).
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    else:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    hold = await ledger.get_hold("r1")
    if point in ("before-reserve",):
        assert hold is None
    if point in ("between", "after-settle"):
        assert hold is not None
    clock.advance(60)
    await ledger.sweep()
    assert await ledger.holds() == []
    status = await ledger.status("user:a")
    assert status is not None
    assert status.held == 0
    assert await ledger.check() == []


# -- usage records and API keys -------------------------------------------------------------


def _record(request_id: str, user: str = "alice", cost: str = "0.5") -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        model="gpt-4o",
        endpoint="/v1/chat/completions",
        status="success",
        usage_source="provider",
        key_id="k1",
        user=user,
        input_tokens=10,
        output_tokens=20,
        cache_read_tokens=3,
        cache_write_tokens=4,
        cost=D(cost),
        latency_ms=123,
    )


async def test_usage_record_written_with_settle(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.reserve("r1", ["user:alice"], D(1), ttl=60)
    await ledger.settle("r1", D("0.5"), record=_record("r1"))
    await ledger.settle("r1", D("0.5"), record=_record("r1"))  # replay: no second row
    clock.advance(1)
    await ledger.reserve("r2", ["user:bob"], D(1), ttl=60)
    await ledger.release("r2", record=_record("r2", user="bob", cost="0"))
    rows = await ledger.usage()
    assert [r.request_id for r in rows] == ["r2", "r1"]
    first = rows[1]
    assert (first.input_tokens, first.output_tokens, first.cache_read_tokens) == (10, 20, 3)
    assert (first.cache_write_tokens, first.cost, first.latency_ms) == (4, D("0.5"), 123)
    assert first.created_at == utc(2026, 1, 15, 12)
    assert [r.request_id for r in await ledger.usage(user="bob")] == ["r2"]
    assert len(await ledger.usage(limit=1)) == 1


# -- response contexts ------------------------------------------------------------------------


def _with_context(request_id: str, context: ResponseContext) -> UsageRecord:
    return dataclasses.replace(_record(request_id), response_context=context)


async def test_settle_remembers_the_response_context(ledger: Ledger) -> None:
    await ledger.reserve("r1", ["user:alice"], D(1), ttl=60)
    context = ResponseContext("user:alice", 1500, response_id="resp_1")
    await ledger.settle("r1", D("0.5"), record=_with_context("r1", context))
    assert await ledger.response_context("resp_1", "user:alice") == 1500
    # Another owner's lookup finds nothing, exactly like an unknown id.
    assert await ledger.response_context("resp_1", "user:bob") is None
    assert await ledger.response_context("resp_unknown", "user:alice") is None
    # A replay writes nothing again (not even other figures).
    other = ResponseContext("user:alice", 99, response_id="resp_1")
    await ledger.settle("r1", D("0.5"), record=_with_context("r1", other))
    assert await ledger.response_context("resp_1", "user:alice") == 1500
    # The usage listing does not carry it.
    assert [r.response_context for r in await ledger.usage()] == [None]


async def test_only_a_charging_settle_remembers(ledger: Ledger) -> None:
    context = ResponseContext("user:alice", 10, response_id="resp_r")
    await ledger.reserve("r1", ["user:alice"], D(1), ttl=60)
    await ledger.release("r1", record=_with_context("r1", context))
    assert await ledger.response_context("resp_r", "user:alice") is None
    # A settle of a released hold is no transition either.
    await ledger.settle("r1", D("0.5"), record=_with_context("r1", context))
    assert await ledger.response_context("resp_r", "user:alice") is None
    with pytest.raises(HoldNotFoundError):
        await ledger.settle("nope", D(1), record=_with_context("nope", context))
    assert await ledger.response_context("resp_r", "user:alice") is None


async def test_a_late_charge_remembers(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.reserve("r1", ["user:alice"], D(1), ttl=5)
    clock.advance(10)
    context = ResponseContext("user:alice", 7, response_id="resp_late")
    hold = await ledger.settle("r1", D("0.5"), record=_with_context("r1", context))
    assert hold.late
    assert await ledger.response_context("resp_late", "user:alice") == 7


async def test_a_conversation_accumulates(ledger: Ledger) -> None:
    async def turn(n: int, tokens: int, growth: int) -> None:
        await ledger.reserve(f"r{n}", ["user:alice"], D(1), ttl=60)
        context = ResponseContext(
            "user:alice", tokens, response_id=f"resp_{n}", conversation_id="conv_1", growth=growth
        )
        await ledger.settle(f"r{n}", D("0.1"), record=_with_context(f"r{n}", context))

    await turn(1, 100, 100)
    assert await ledger.response_context("conv_1", "user:alice") == 100
    await turn(2, 150, 50)  # saw 100, added 50
    assert await ledger.response_context("conv_1", "user:alice") == 150
    await turn(3, 130, 30)  # ran beside turn 2 (saw 100, added 30): both additions count
    assert await ledger.response_context("conv_1", "user:alice") == 180
    await turn(4, 500, 0)  # a report larger than what was known wins
    assert await ledger.response_context("conv_1", "user:alice") == 500
    # Each response id keeps its own figure.
    assert await ledger.response_context("resp_3", "user:alice") == 130
    assert await ledger.response_context("conv_1", "user:bob") is None


async def test_response_contexts_expire(ledger: Ledger, clock: FakeClock) -> None:
    await ledger.reserve("r1", ["user:alice"], D(1), ttl=60)
    context = ResponseContext(
        "user:alice", 40, response_id="resp_1", conversation_id="conv_1", growth=40, ttl=100
    )
    await ledger.settle("r1", D("0.1"), record=_with_context("r1", context))
    clock.advance(99)
    assert await ledger.response_context("resp_1", "user:alice") == 40
    clock.advance(1)  # expired at exactly its TTL, like a hold
    assert await ledger.response_context("resp_1", "user:alice") is None
    assert await ledger.response_context("conv_1", "user:alice") is None
    assert await ledger.sweep() == 0  # prunes them; still counts only holds
    # An expired conversation starts afresh instead of growing from the forgotten figure.
    await ledger.reserve("r2", ["user:alice"], D(1), ttl=60)
    again = ResponseContext("user:alice", 25, conversation_id="conv_1", growth=25)
    await ledger.settle("r2", D("0.1"), record=_with_context("r2", again))
    assert await ledger.response_context("conv_1", "user:alice") == 25


@pytest.mark.parametrize(
    "fields",
    [
        {"owner": "alice", "tokens": 1, "response_id": "r"},
        {"owner": "user:a", "tokens": -1, "response_id": "r"},
        {"owner": "user:a", "tokens": True, "response_id": "r"},
        {"owner": "user:a", "tokens": 1.0, "response_id": "r"},
        {"owner": "user:a", "tokens": 1, "growth": -1, "response_id": "r"},
        {"owner": "user:a", "tokens": 1},
        {"owner": "user:a", "tokens": 1, "response_id": ""},
        {"owner": "user:a", "tokens": 1, "conversation_id": "x" * 256},
        {"owner": "user:a", "tokens": 1, "response_id": "r", "ttl": 0},
    ],
)
def test_bad_response_contexts(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        ResponseContext(**fields)  # type: ignore[arg-type]


async def test_bad_response_context_lookups(ledger: Ledger) -> None:
    with pytest.raises(ConfigurationError):
        await ledger.response_context("", "user:alice")
    with pytest.raises(InvalidScopeError):
        await ledger.response_context("resp_1", "alice")


async def test_api_key_crud(ledger: Ledger) -> None:
    record = ApiKeyRecord(
        key_id="k1",
        key_hash="a" * 64,
        prefix="gk_abc",
        user="alice",
        team="t1",
        allowed_models=("gpt-4o", "claude-haiku-4-5"),
        rpm=60,
        tpm=10_000,
        expires_at=utc(2027, 1, 1),
    )
    stored = await ledger.create_key(record)
    assert stored.created_at == utc(2026, 1, 15, 12)
    assert await ledger.find_key("a" * 64) == stored
    assert await ledger.find_key("b" * 64) is None
    with pytest.raises(ConfigurationError):
        await ledger.create_key(record)
    await ledger.create_key(ApiKeyRecord(key_id="k2", key_hash="c" * 64, prefix="p", user="bob"))
    assert [k.key_id for k in await ledger.list_keys()] == ["k1", "k2"]
    assert [k.key_id for k in await ledger.list_keys(user="bob")] == ["k2"]
    assert await ledger.revoke_key("k1") is True
    assert await ledger.revoke_key("missing") is False
    revoked = await ledger.find_key("a" * 64)
    assert revoked is not None
    assert revoked.revoked
    assert "a" * 64 not in repr(revoked)


async def test_update_key_sets_and_clears_limits(ledger: Ledger) -> None:
    await ledger.create_key(
        ApiKeyRecord(key_id="k1", key_hash="a" * 64, prefix="p", user="u", rpm=5)
    )
    updated = await ledger.update_key("k1", tpm=1000)
    assert updated is not None
    assert (updated.rpm, updated.tpm) == (5, 1000)
    assert await ledger.find_key("a" * 64) == updated
    cleared = await ledger.update_key("k1", rpm=None, tpm=2000)
    assert cleared is not None
    assert (cleared.rpm, cleared.tpm) == (None, 2000)
    assert await ledger.update_key("missing", rpm=1) is None
    bad_changes: list[dict[str, Any]] = [
        {}, {"revoked": 1}, {"rpm": 0}, {"tpm": True}, {"tpm": 2**31}, {"rpm": 1.5},
    ]  # fmt: skip
    for bad in bad_changes:
        with pytest.raises(ConfigurationError):
            await ledger.update_key("k1", **bad)
    assert await ledger.find_key("a" * 64) == cleared


async def test_key_epoch_counts_own_key_changes_before_they_return(ledger: Ledger) -> None:
    """The optional change signal StandaloneMode's key cache follows (see ``Ledger``)."""
    signalling: Any = ledger
    epoch: int | None = getattr(signalling, "key_epoch", None)
    if epoch is None:
        pytest.skip("this backend offers no key_epoch")
    await ledger.create_key(ApiKeyRecord(key_id="k1", key_hash="a" * 64, prefix="p", user="u"))
    after_create: int = signalling.key_epoch
    assert after_create > epoch
    assert await ledger.revoke_key("k1")
    after_revoke: int = signalling.key_epoch
    assert after_revoke > after_create
    assert await ledger.update_key("k1", tpm=10)
    assert signalling.key_epoch > after_revoke


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "amount", [D(-1), D("NaN"), D("Infinity"), 0.5, "abc", True, None], ids=repr
)
async def test_bad_amounts(ledger: Ledger, amount: object) -> None:
    with pytest.raises(InvalidAmountError):
        await ledger.reserve("r1", ["user:a"], amount, ttl=60)  # type: ignore[arg-type]
    await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
    with pytest.raises(InvalidAmountError):
        await ledger.settle("r1", amount)  # type: ignore[arg-type]
    if amount is not None:  # a None limit means unlimited
        with pytest.raises(InvalidAmountError):
            await ledger.set_budget("user:a", limit=amount)  # type: ignore[arg-type]
    await ledger.release("r1")


@pytest.mark.parametrize("scopes", [[], "user:a", ["user"], ["User:a"], ["user:a b"], [""], [1]])
async def test_bad_scopes(ledger: Ledger, scopes: object) -> None:
    with pytest.raises(InvalidScopeError):
        await ledger.reserve("r1", scopes, D(1), ttl=60)  # type: ignore[arg-type]


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), "10", True])
async def test_bad_ttl(ledger: Ledger, ttl: object) -> None:
    with pytest.raises(ConfigurationError):
        await ledger.reserve("r1", ["user:a"], D(1), ttl=ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize("hold_id", ["", " ", "x" * 256, None, 5])
async def test_bad_hold_ids(ledger: Ledger, hold_id: object) -> None:
    with pytest.raises(ConfigurationError):
        await ledger.reserve(hold_id, ["user:a"], D(1), ttl=60)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        await ledger.release(hold_id)  # type: ignore[arg-type]


# -- persistence ----------------------------------------------------------------------------------


async def test_state_survives_reopen(backend: Backend, opener: Opener, clock: FakeClock) -> None:
    if not backend.persistent:
        pytest.skip(f"{backend.name} does not persist across reopen")
    first = opener()
    await first.open()
    await first.set_budget("user:a", limit=D(3), period=Period("week"))
    await first.reserve("r1", ["user:a"], D(1), ttl=60)
    await first.reserve("r2", ["user:a"], D(1), ttl=60)
    await first.settle("r2", D("0.25"))
    await first.aclose()
    second = opener()
    await second.open()
    try:
        status = await second.status("user:a")
        assert status is not None
        assert (status.limit, status.period, status.spent, status.held) == (
            D(3),
            Period("week"),
            D("0.25"),
            D(1),
        )
        assert (await second.settle("r1", D(1))).state is HoldState.SETTLED
        assert await second.check() == []
    finally:
        await second.aclose()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("output_tokens", 10**30),
        ("input_tokens", MAX_TOKENS + 1),
        ("cache_read_tokens", -1),
        ("cache_write_tokens", True),
        ("input_tokens", "10"),
        ("latency_ms", 2**63),
        ("model", None),
    ],
)
async def test_unstorable_usage_records_are_refused_and_store_nothing(
    ledger: Ledger, field: str, value: object
) -> None:
    await ledger.reserve("r1", ["user:a"], D(1), ttl=60)
    bad = dataclasses.replace(_record("r1"), **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=field):
        await ledger.settle("r1", D("0.5"), record=bad)
    with pytest.raises(ConfigurationError, match=field):
        await ledger.release("r1", record=bad)
    with pytest.raises(ConfigurationError, match=field):
        await ledger.release("unknown", record=bad)  # no tombstone either
    assert await ledger.get_hold("unknown") is None
    hold = await ledger.get_hold("r1")
    assert hold is not None
    assert hold.live
    edge = dataclasses.replace(_record("r1"), output_tokens=MAX_TOKENS, cache_read_tokens=0)
    assert (await ledger.settle("r1", D("0.5"), record=edge)).state is HoldState.SETTLED
    assert [r.output_tokens for r in await ledger.usage()] == [MAX_TOKENS]
