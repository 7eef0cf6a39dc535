"""Fitted reserves (``OutputFit``): the ledger decides the largest hold that fits, atomically.

Every test runs on every backend in BACKENDS (the model, SQLite, PostgreSQL).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewaykit.errors import BudgetExceeded, ConfigurationError, HoldConflictError
from gatewaykit.ledger.base import Hold, Ledger, OutputFit, Period
from gatewaykit.money import from_nanos

pytestmark = pytest.mark.anyio

D = Decimal
#: A prompt of 1,000 tokens at $2.50/Mtok, output at $10/Mtok (gpt-4o's prices).
FIT = OutputFit(base=D("0.0025"), per_token=D("0.00001"), min_tokens=256, max_tokens=4096)
FULL = from_nanos(FIT.nanos(4096))  # $0.04346


def test_output_fit_arithmetic() -> None:
    assert FIT.nanos(0) == 2_500_000
    assert FIT.nanos(4096) == 43_460_000
    assert FIT.tokens_within(43_460_000) == 4096
    assert FIT.tokens_within(10**12) == 4096  # never more than asked
    assert FIT.tokens_within(12_499_999) == 999
    assert FIT.tokens_within(12_500_000) == 1000
    assert FIT.tokens_within(FIT.nanos(256) - 1) is None
    assert FIT.tokens_within(-5) is None
    assert FIT.tokens_held(from_nanos(FIT.nanos(1000))) == 1000


@given(
    base=st.decimals(min_value=0, max_value=10, places=12),
    per_mtok=st.decimals(min_value=0, max_value=100, places=6),
    low=st.integers(0, 300),
    span=st.integers(0, 5000),
    room=st.integers(-(10**6), 10**9),
)
def test_output_fit_picks_the_largest_hold_within_room(
    base: Decimal, per_mtok: Decimal, low: int, span: int, room: int
) -> None:
    fit = OutputFit(base=base, per_token=per_mtok / 10**6, min_tokens=low, max_tokens=low + span)
    tokens = fit.tokens_within(room)
    if tokens is None:
        assert fit.nanos(low) > room
        return
    assert low <= tokens <= fit.max_tokens
    assert fit.nanos(tokens) <= room
    assert tokens == fit.max_tokens or fit.nanos(tokens + 1) > room
    assert fit.tokens_held(from_nanos(fit.nanos(tokens))) == tokens


@pytest.mark.parametrize(
    "fields",
    [
        {"min_tokens": 10, "max_tokens": 5},
        {"min_tokens": -1},
        {"max_tokens": True},
        {"base": 0.5},
        {"per_token": D("-1")},
        {"per_token": D("1E-60")},
    ],
)
def test_bad_output_fits(fields: dict[str, object]) -> None:
    values: dict[str, object] = {
        "base": D(0),
        "per_token": D("0.00001"),
        "min_tokens": 1,
        "max_tokens": 10,
    }
    values.update(fields)
    with pytest.raises(ConfigurationError):
        OutputFit(**values)  # type: ignore[arg-type]


async def test_full_hold_when_it_fits(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("1"))
    hold = await ledger.reserve("r1", ["user:a"], FULL, ttl=60, fit=FIT)
    assert hold.amount == FULL
    assert FIT.tokens_held(hold.amount) == 4096


async def test_fits_the_tightest_budget(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("1"))
    await ledger.set_budget("key:k", limit=D("0.0125"), period=Period("day"))
    hold = await ledger.reserve("r1", ["user:a", "key:k", "team:t"], FULL, ttl=60, fit=FIT)
    assert hold.amount == D("0.0125")  # exactly 1,000 output tokens
    assert FIT.tokens_held(hold.amount) == 1000
    assert dict(hold.remaining) == {"key:k": D(0), "team:t": None, "user:a": D("0.9875")}
    status = await ledger.status("key:k")
    assert status is not None
    assert status.held == D("0.0125")
    await ledger.settle("r1", D("0.003"))
    assert await ledger.check() == []


async def test_refused_only_when_min_tokens_do_not_fit(ledger: Ledger) -> None:
    minimum = from_nanos(FIT.nanos(256))  # $0.00506
    await ledger.set_budget("user:a", limit=minimum - D("0.000000001"))
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve("r1", ["user:a"], FULL, ttl=60, fit=FIT)
    assert refused.value.scope == "user:a"
    assert refused.value.requested == minimum
    assert await ledger.get_hold("r1") is None
    await ledger.set_budget("user:a", limit=minimum)
    hold = await ledger.reserve("r1", ["user:a"], FULL, ttl=60, fit=FIT)
    assert hold.amount == minimum


async def test_overspent_budget_refuses_a_fit(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("0.01"))
    await ledger.reserve("r1", ["user:a"], D("0.01"), ttl=60)
    await ledger.settle("r1", D("0.02"))  # an overrun: remaining is now negative
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve("r2", ["user:a"], FULL, ttl=60, fit=FIT)
    assert refused.value.remaining == D("-0.01")


async def test_fitted_replay_returns_the_stored_hold(ledger: Ledger) -> None:
    await ledger.set_budget("user:a", limit=D("0.0125"))
    hold = await ledger.reserve("r1", ["user:a"], FULL, ttl=60, fit=FIT)
    await ledger.set_budget("user:a", limit=D("1"))  # more room now: the replay keeps its hold
    again = await ledger.reserve("r1", ["user:a"], FULL, ttl=60, fit=FIT)
    assert again == hold
    with pytest.raises(HoldConflictError):  # without the fit, the amounts differ
        await ledger.reserve("r1", ["user:a"], FULL, ttl=60)
    with pytest.raises(ConfigurationError):  # a fit must price the amount asked
        await ledger.reserve("r2", ["user:a"], D("1"), ttl=60, fit=FIT)


async def test_concurrent_fits_never_share_room(ledger: Ledger) -> None:
    """20 fitted reserves race for $0.05: each takes the room the ones before it left."""
    await ledger.set_budget("user:a", limit=D("0.05"))

    async def one(n: int) -> Hold | BaseException:
        try:
            return await ledger.reserve(f"r{n}", ["user:a"], FULL, ttl=60, fit=FIT)
        except BudgetExceeded as exc:
            return exc

    results = await asyncio.gather(*(one(n) for n in range(20)))
    held = [r.amount for r in results if isinstance(r, Hold)]
    assert all(isinstance(r, (Hold, BudgetExceeded)) for r in results)
    assert sum(held) <= D("0.05")
    # Whoever came last found less than the minimum left.
    assert D("0.05") - sum(held) < from_nanos(FIT.nanos(256))
    status = await ledger.status("user:a")
    assert status is not None
    assert status.held == sum(held)
    assert status.remaining is not None
    assert status.remaining >= 0
    assert await ledger.check() == []
