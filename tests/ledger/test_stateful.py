"""Hypothesis drives every backend and the reference model side by side.

Each step runs one operation on both, compares the replies (values or error kinds), then
checks the backend's ``check()``, the model's own invariants I1–I11, and that every
budget and every hold reads back identically. Time is a shared fake clock the machine
advances as a rule. Concurrent reserves run with ``asyncio.gather`` on the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Awaitable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gatewaykit.errors import BudgetExceeded, ConcurrencyExceeded, GatewayKitError
from gatewaykit.ledger.base import Hold, Ledger, OutputFit, Period, UsageGroup, UsageRecord
from gatewaykit.money import from_nanos
from tests.ledger.backends import BACKENDS, Backend, FakeClock
from tests.ledger.model import ModelLedger

SCOPES = ["user:a", "user:b", "team:t", "key:k"]
PERIODS = [Period(), Period("day"), Period("rolling", 3600), Period("month")]
AMOUNTS = [Decimal(0), Decimal("0.000000001"), Decimal("0.25"), Decimal("1"), Decimal("2.5")]
LIMITS = [None, Decimal(0), Decimal("1"), Decimal("3"), Decimal("10")]
TTLS = [1, 30, 600]
STEPS = [0.000001, 0.5, 29, 30, 600, 3600, 86_400]
#: Fitted reserves: full holds of $0.6 to $10.1, smallest ones of $0.003 to $0.15.
FITS = [
    OutputFit(base=Decimal("0.1"), per_token=Decimal("0.01"), min_tokens=5, max_tokens=1000),
    OutputFit(base=Decimal(0), per_token=Decimal("0.003"), min_tokens=1, max_tokens=200),
    OutputFit(
        base=Decimal("0.0000000005"),
        per_token=Decimal("0.0000333"),
        min_tokens=256,
        max_tokens=20_000,
    ),
]


def outcome(value: Any) -> Any:
    """What must match between backend and model: values, or the error's kind and facts."""
    if isinstance(value, BudgetExceeded):
        return ("BudgetExceeded", value.scope, value.limit, value.spent, value.held)
    if isinstance(value, ConcurrencyExceeded):
        return ("ConcurrencyExceeded", value.scope, value.limit, value.live)
    if isinstance(value, GatewayKitError):
        return type(value).__name__
    return value


class LedgerMachine(RuleBasedStateMachine):
    backend: Backend

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = Path(tempfile.mkdtemp(prefix="gk-stateful-"))
        self.clock = FakeClock()
        self.model = ModelLedger(self.clock)
        self.stack = contextlib.AsyncExitStack()
        self.opener = self.run(
            self.stack.enter_async_context(self.backend.make(self.clock, self.tmp))
        )
        self.ledger: Ledger = self.opener()
        self.run(self.ledger.open())
        self.params: dict[str, tuple[list[str], Decimal, OutputFit | None]] = {}
        self.counter = 0

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def both(self, name: str, *args: Any, **kwargs: Any) -> Any:
        async def call(target: Any) -> Any:
            try:
                return await getattr(target, name)(*args, **kwargs)
            except GatewayKitError as exc:
                return exc

        real = self.run(call(self.ledger))
        expected = self.run(call(self.model))
        assert outcome(real) == outcome(expected), f"{name}{args}: {real!r} != {expected!r}"
        return real

    def teardown(self) -> None:
        try:
            self.run(self.ledger.aclose())
            self.run(self.stack.aclose())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def fresh_id(self) -> str:
        self.counter += 1
        return f"h{self.counter}"

    # -- rules -----------------------------------------------------------------------------
    @initialize(
        limits=st.lists(st.sampled_from(LIMITS), min_size=4, max_size=4),
        periods=st.lists(st.sampled_from(PERIODS), min_size=4, max_size=4),
    )
    def budgets(self, limits: list[Decimal | None], periods: list[Period]) -> None:
        for scope, limit, period in zip(SCOPES[:3], limits, periods, strict=False):
            self.both("set_budget", scope, limit=limit, period=period)

    @rule(
        scopes=st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3, unique=True),
        amount=st.sampled_from(AMOUNTS),
        ttl=st.sampled_from(TTLS),
    )
    def reserve(self, scopes: list[str], amount: Decimal, ttl: int) -> None:
        hold_id = self.fresh_id()
        self.params[hold_id] = (scopes, amount, None)
        self.both("reserve", hold_id, scopes, amount, ttl=ttl)

    @rule(
        scopes=st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3, unique=True),
        fit=st.sampled_from(FITS),
        ttl=st.sampled_from(TTLS),
    )
    def reserve_fitted(self, scopes: list[str], fit: OutputFit, ttl: int) -> None:
        """The largest hold that fits every budget, or a refusal at the smallest."""
        hold_id = self.fresh_id()
        amount = from_nanos(fit.nanos(fit.max_tokens))
        self.params[hold_id] = (scopes, amount, fit)
        self.both("reserve", hold_id, scopes, amount, ttl=ttl, fit=fit)

    @rule(
        scopes=st.lists(st.sampled_from(SCOPES), min_size=1, max_size=3, unique=True),
        amount=st.sampled_from(AMOUNTS),
        most=st.integers(1, 3),
        fit=st.none() | st.sampled_from(FITS),
    )
    def reserve_capped(
        self, scopes: list[str], amount: Decimal, most: int, fit: OutputFit | None
    ) -> None:
        """A cap on the live holds of the hold's first scope (and a fit, sometimes)."""
        hold_id = self.fresh_id()
        if fit is not None:
            amount = from_nanos(fit.nanos(fit.max_tokens))
        self.params[hold_id] = (scopes, amount, fit)
        caps = {scopes[0]: most}
        self.both("reserve", hold_id, scopes, amount, ttl=30, fit=fit, max_live=caps)

    @rule(count=st.integers(2, 12), most=st.integers(1, 4), amount=st.sampled_from(AMOUNTS))
    def concurrent_capped_reserves(self, count: int, most: int, amount: Decimal) -> None:
        """Capped reserves race on the backend: no more are admitted than the cap allows.

        A refusal's kind cannot depend on the order: after a budget refusal no equal
        reserve fits, and a scope at its cap stays there while no time passes.
        """
        ids = [self.fresh_id() for _ in range(count)]
        caps = {"user:a": most}
        for hold_id in ids:
            self.params[hold_id] = (["user:a", "key:k"], amount, None)

        async def race() -> list[Any]:
            return await asyncio.gather(
                *(
                    self.ledger.reserve(h, ["user:a", "key:k"], amount, ttl=30, max_live=caps)
                    for h in ids
                ),
                return_exceptions=True,
            )

        self.run(self.model.sweep_scope("user:a"))
        before = self.model.live_holds("user:a")
        results = self.run(race())
        kinds = (Hold, BudgetExceeded, ConcurrencyExceeded)
        assert all(isinstance(r, kinds) for r in results), results
        assert sum(isinstance(r, Hold) for r in results) <= max(0, most - before)
        for hold_id, result in zip(ids, results, strict=True):
            if isinstance(result, Hold):
                self.run(self.model.reserve(hold_id, ["user:a", "key:k"], amount, ttl=30))
        for hold_id, result in zip(ids, results, strict=True):
            if not isinstance(result, Hold):
                with pytest.raises(type(result)):
                    self.run(
                        self.model.reserve(
                            hold_id, ["user:a", "key:k"], amount, ttl=30, max_live=caps
                        )
                    )

    @precondition(lambda self: bool(self.params))
    @rule(data=st.data(), ttl=st.sampled_from(TTLS), conflicting=st.booleans())
    def replay_reserve(self, data: st.DataObject, ttl: int, conflicting: bool) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.params)))
        scopes, amount, fit = self.params[hold_id]
        if conflicting:
            amount += Decimal(1)
        self.both("reserve", hold_id, list(reversed(scopes)), amount, ttl=ttl, fit=fit)

    @precondition(lambda self: bool(self.params))
    @rule(data=st.data(), actual=st.sampled_from([*AMOUNTS, Decimal("7")]))
    def settle(self, data: st.DataObject, actual: Decimal) -> None:
        hold_id = data.draw(st.sampled_from(sorted(self.params)))
        self.both("settle", hold_id, actual)

    @precondition(lambda self: bool(self.params))
    @rule(data=st.data(), actual=st.sampled_from(AMOUNTS))
    def settle_with_record(self, data: st.DataObject, actual: Decimal) -> None:
        """The usage record is written with the transition, once."""
        hold_id = data.draw(st.sampled_from(sorted(self.params)))
        record = UsageRecord(
            request_id=hold_id,
            model="m",
            endpoint="/v1/chat/completions",
            status="success",
            usage_source="provider",
            user="alice",
            input_tokens=3,
            cost=actual,
        )
        self.both("settle", hold_id, actual, record=record)

    @precondition(lambda self: bool(self.params))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.both("release", data.draw(st.sampled_from(sorted(self.params))))

    @rule(scope=st.sampled_from(SCOPES))
    def delete_budget(self, scope: str) -> None:
        self.both("delete_budget", scope)

    @rule()
    def release_first(self) -> None:
        """F8: a release before its reserve leaves a tombstone the reserve then returns."""
        hold_id = self.fresh_id()
        self.params[hold_id] = (["user:a"], Decimal(1), None)
        self.both("release", hold_id)

    @precondition(lambda self: bool(self.params))
    @rule(data=st.data(), ttl=st.sampled_from(TTLS))
    def extend(self, data: st.DataObject, ttl: int) -> None:
        self.both("extend", data.draw(st.sampled_from(sorted(self.params))), ttl=ttl)

    @rule(seconds=st.sampled_from(STEPS))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        self.both("sweep")
        assert self.model.invariants(swept=True) == []

    @rule(scope=st.sampled_from(SCOPES[:3]), limit=st.sampled_from(LIMITS))
    def change_limit(self, scope: str, limit: Decimal | None) -> None:
        status = self.run(self.model.status(scope))
        period = status.period if status is not None else Period()
        self.both("set_budget", scope, limit=limit, period=period)

    @rule(count=st.integers(2, 12), amount=st.sampled_from(AMOUNTS[1:]))
    def concurrent_reserves(self, count: int, amount: Decimal) -> None:
        """Equal reserves race on the backend; the model admits the same number."""
        ids = [self.fresh_id() for _ in range(count)]
        for hold_id in ids:
            self.params[hold_id] = (["user:a"], amount, None)

        async def race() -> list[Any]:
            return await asyncio.gather(
                *(self.ledger.reserve(h, ["user:a"], amount, ttl=30) for h in ids),
                return_exceptions=True,
            )

        results = self.run(race())
        admitted = [h for h, r in zip(ids, results, strict=True) if isinstance(r, Hold)]
        refused = [h for h, r in zip(ids, results, strict=True) if not isinstance(r, Hold)]
        assert all(isinstance(r, (Hold, BudgetExceeded)) for r in results), results
        for hold_id in admitted:  # the model takes them in the backend's winning order
            assert isinstance(
                self.run(self.model.reserve(hold_id, ["user:a"], amount, ttl=30)), Hold
            )
        for hold_id in refused:
            with pytest.raises(BudgetExceeded):
                self.run(self.model.reserve(hold_id, ["user:a"], amount, ttl=30))

    @rule(count=st.integers(2, 12), fit=st.sampled_from(FITS))
    def concurrent_fitted_reserves(self, count: int, fit: OutputFit) -> None:
        """Fitted reserves race on the backend: each fits into what the others left.

        Which hold got which room depends on the backend's order; the model takes each
        admitted hold at the amount the backend chose, then refuses the refused ones.
        """
        ids = [self.fresh_id() for _ in range(count)]
        amount = from_nanos(fit.nanos(fit.max_tokens))
        for hold_id in ids:
            self.params[hold_id] = (["user:a"], amount, fit)

        async def race() -> list[Any]:
            return await asyncio.gather(
                *(self.ledger.reserve(h, ["user:a"], amount, ttl=30, fit=fit) for h in ids),
                return_exceptions=True,
            )

        results = self.run(race())
        assert all(isinstance(r, (Hold, BudgetExceeded)) for r in results), results
        for hold_id, result in zip(ids, results, strict=True):
            if isinstance(result, Hold):
                assert fit.nanos(fit.min_tokens) <= fit.nanos(fit.tokens_held(result.amount))
                assert result.amount <= amount
                self.run(self.model.reserve(hold_id, ["user:a"], result.amount, ttl=30))
        for hold_id, result in zip(ids, results, strict=True):
            if not isinstance(result, Hold):
                with pytest.raises(BudgetExceeded):
                    self.run(self.model.reserve(hold_id, ["user:a"], amount, ttl=30, fit=fit))

    @precondition(lambda self: self.backend.persistent)
    @rule()
    def reopen(self) -> None:
        """Close and reopen the store: nothing acknowledged may be lost."""
        self.run(self.ledger.aclose())
        self.ledger = self.opener()
        self.run(self.ledger.open())

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def healthy_and_identical(self) -> None:
        assert self.run(self.ledger.check()) == []
        assert self.model.invariants() == []
        assert self.run(self.ledger.budgets()) == self.run(self.model.budgets())
        real = self.run(self.ledger.holds(live_only=False, limit=10_000))
        expected = self.run(self.model.holds(live_only=False, limit=10_000))
        assert sorted(real, key=lambda h: h.hold_id) == sorted(expected, key=lambda h: h.hold_id)
        assert self.run(self.ledger.usage(limit=10_000)) == self.run(self.model.usage(limit=10_000))
        groups: tuple[UsageGroup, ...] = ("day", "user", "key", "model")
        real_totals = self.run(self.ledger.usage_totals(group_by=groups))
        assert real_totals == self.run(self.model.usage_totals(group_by=groups))


def _machine(backend: Backend) -> type[Any]:
    machine: type[LedgerMachine] = type(
        f"Machine_{backend.name}", (LedgerMachine,), {"backend": backend}
    )
    case: type[Any] = machine.TestCase
    case.settings = settings(
        max_examples=backend.stateful_examples,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    case.pytestmark = list(backend.marks)
    return case


for _name, _backend in BACKENDS.items():
    if _name == "model":
        continue  # the model against itself proves nothing
    globals()[f"TestStateful_{_name.replace('-', '_')}"] = _machine(_backend)
