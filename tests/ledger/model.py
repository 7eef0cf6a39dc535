"""A pure-Python reference ledger: the executable specification every backend must match.

It implements the ``Ledger`` protocol in memory, with the semantics of docs/ledger.md and
docs/ledger.md, written for clarity rather than speed. The stateful test drives a real
backend and this model side by side and compares every reply; the model also checks
invariants I1–I11 on its own state (:meth:`ModelLedger.invariants`).

Rules the backends share (spelled out here because the model is the spec):

* Times are integer microseconds of the store clock; a hold is *due* when
  ``now >= expires_at`` and never before (I6).
* Any operation by hold id that finds its hold ``held`` and due first expires it
  ("touch"); ``reserve`` of a new id first expires every due hold sharing one of its scopes.
* A new reserve is refused (nothing stored except the reclaim) when, for some scope with a
  limit, ``spent + reserved + amount > limit`` in that scope's current window; the first
  refusing scope in sorted order is reported. Before the budgets, a scope capped by
  ``max_live`` refuses (ConcurrencyExceeded) when its live holds, in all its windows,
  already number its cap. A fitted reserve (``OutputFit``) tries the largest hold the
  tightest limited budget has room for.
* A hold settles into the windows recorded when it was taken (I10).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from gatewaykit.errors import (
    BudgetExceeded,
    ConcurrencyExceeded,
    ConfigurationError,
    HoldClosedError,
    HoldConflictError,
    HoldNotFoundError,
)
from gatewaykit.ledger.base import (
    DENIAL_RETENTION,
    ApiKeyRecord,
    BudgetStatus,
    DenialCount,
    Hold,
    HoldState,
    OutputFit,
    Period,
    UsageFilter,
    UsageGroup,
    UsageRecord,
    UsageTotal,
    sort_totals,
    validate_context_id,
    validate_denial_range,
    validate_denials,
    validate_fit,
    validate_hold_id,
    validate_key_limits,
    validate_limit,
    validate_max_live,
    validate_record,
    validate_scopes,
    validate_ttl,
    validate_usage_filter,
    validate_usage_groups,
)
from gatewaykit.money import from_nanos, to_nanos

_EPOCH_UTC = datetime(1970, 1, 1, tzinfo=timezone.utc)

__all__ = ["ModelLedger", "from_us", "select_usage", "to_us", "total_usage"]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
NO_PERIOD = Period()


def to_us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _matches(record: UsageRecord, query: UsageFilter) -> bool:
    at = record.created_at
    return (
        (query.since is None or (at is not None and at >= query.since))
        and (query.until is None or (at is not None and at < query.until))
        and (query.user is None or record.user == query.user)
        and (query.key is None or record.key_id == query.key)
        and (query.model is None or record.model == query.model)
    )


def select_usage(records: Sequence[UsageRecord], query: UsageFilter) -> list[UsageRecord]:
    """``records`` (oldest first) that match ``query``, newest first (stable on time ties)."""
    matching = [r for r in reversed(records) if _matches(r, query)]
    return sorted(matching, key=lambda r: r.created_at or _EPOCH_UTC, reverse=True)


def total_usage(
    records: Sequence[UsageRecord], groups: tuple[UsageGroup, ...], query: UsageFilter
) -> list[UsageTotal]:
    """The reference ``usage_totals``: sums per group in pure Python."""
    value = {
        "user": lambda r: r.user,
        "key": lambda r: r.key_id,
        "model": lambda r: r.model,
        "day": lambda r: r.created_at.astimezone(timezone.utc).date(),
    }
    sums: dict[tuple[object, ...], list[Any]] = {}
    for record in records:
        if _matches(record, query):
            group = tuple(value[g](record) for g in groups)
            total = sums.setdefault(group, [0, 0, 0, 0, 0, Decimal(0)])
            total[0] += 1
            total[1] += record.input_tokens
            total[2] += record.output_tokens
            total[3] += record.cache_read_tokens
            total[4] += record.cache_write_tokens
            total[5] += record.cost
    return sort_totals([UsageTotal(group, *total) for group, total in sums.items()])  # type: ignore[arg-type]


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def window_of(period: Period, now_us: int) -> tuple[int, datetime, datetime | None]:
    """(window key in epoch seconds, window start, window end) of ``period`` at ``now_us``."""
    start, end = period.window(from_us(now_us))
    return int((start - EPOCH).total_seconds()), start, end


@dataclasses.dataclass
class MHold:
    hold_id: str
    scopes: tuple[str, ...]
    windows: dict[str, int]
    amount: int
    state: HoldState
    created_us: int
    expires_us: int
    charged: int = 0
    late: bool = False
    ended_us: int | None = None

    def view(self) -> Hold:
        return Hold(
            hold_id=self.hold_id,
            scopes=self.scopes,
            amount=from_nanos(self.amount),
            state=self.state,
            created_at=from_us(self.created_us),
            expires_at=from_us(self.expires_us),
            charged=from_nanos(self.charged),
            overrun=from_nanos(max(0, self.charged - self.amount)),
            late=self.late,
        )


@dataclasses.dataclass
class Counter:
    spent: int = 0
    reserved: int = 0
    live: int = 0


class ModelLedger:
    """The reference model. ``clock`` returns store time in seconds (float)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.budgets_: dict[str, tuple[int | None, Period]] = {}
        self.counters: dict[tuple[str, int], Counter] = {}
        self.holds_: dict[str, MHold] = {}
        self.order: list[str] = []
        self.usage_: list[UsageRecord] = []
        self.keys: dict[str, ApiKeyRecord] = {}
        self.key_order: list[str] = []
        #: Remembered response contexts: (id, owner) -> (tokens, expires at).
        self.contexts: dict[tuple[str, str], tuple[int, int]] = {}
        #: The optional change signal (see ``Ledger``): bumped by every key change.
        self.key_epoch = 0
        #: Refusals per (UTC hour, reason).
        self.denials_: dict[tuple[datetime, str], int] = {}

    # -- lifecycle (so the model can stand in for a backend) ---------------------------
    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def __aenter__(self) -> ModelLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def now(self) -> int:
        return to_us(self.clock())

    # -- budgets -----------------------------------------------------------------------
    def _period(self, scope: str) -> Period:
        budget = self.budgets_.get(scope)
        return budget[1] if budget else Period()

    def _status(self, scope: str, now: int) -> BudgetStatus:
        limit, period = self.budgets_.get(scope, (None, Period()))
        key, start, end = window_of(period, now)
        counter = self.counters.get((scope, key), Counter())
        return BudgetStatus(
            scope=scope,
            limit=None if limit is None else from_nanos(limit),
            period=period,
            spent=from_nanos(counter.spent),
            held=from_nanos(counter.reserved),
            window_start=start,
            resets_at=end,
        )

    def _known(self, scope: str) -> bool:
        return scope in self.budgets_ or any(s == scope for s, _ in self.counters)

    async def set_budget(
        self, scope: str, *, limit: Decimal | None, period: Period = NO_PERIOD
    ) -> BudgetStatus:
        (scope,) = validate_scopes([scope])
        if not isinstance(period, Period):
            raise ConfigurationError(f"period must be a Period, got {period!r}")
        self.budgets_[scope] = (None if limit is None else to_nanos(limit), period)
        return self._status(scope, self.now())

    async def delete_budget(self, scope: str) -> bool:
        (scope,) = validate_scopes([scope])
        return self.budgets_.pop(scope, None) is not None

    async def status(self, scope: str) -> BudgetStatus | None:
        (scope,) = validate_scopes([scope])
        return self._status(scope, self.now()) if self._known(scope) else None

    async def budgets(self) -> list[BudgetStatus]:
        now = self.now()
        scopes = set(self.budgets_) | {s for s, _ in self.counters}
        return [self._status(s, now) for s in sorted(scopes)]

    # -- holds -------------------------------------------------------------------------
    def _expire(self, hold: MHold, now: int) -> None:
        assert hold.state is HoldState.HELD
        assert now >= hold.expires_us
        hold.state = HoldState.EXPIRED
        hold.ended_us = now
        for scope, key in hold.windows.items():
            self.counters[(scope, key)].reserved -= hold.amount
            self.counters[(scope, key)].live -= 1

    def _touch(self, hold: MHold, now: int) -> None:
        if hold.state is HoldState.HELD and now >= hold.expires_us:
            self._expire(hold, now)

    async def reserve(
        self,
        hold_id: str,
        scopes: Sequence[str],
        amount: Decimal,
        *,
        ttl: float,
        fit: OutputFit | None = None,
        max_live: Mapping[str, int] | None = None,
    ) -> Hold:
        hold_id = validate_hold_id(hold_id)
        scope_t = validate_scopes(scopes)
        nanos = to_nanos(amount)
        ttl = validate_ttl(ttl)
        fit = validate_fit(fit, nanos)
        caps = validate_max_live(max_live, scope_t)
        now = self.now()
        existing = self.holds_.get(hold_id)
        if existing is not None:
            if existing.state is HoldState.RELEASED and not existing.scopes:
                return existing.view()
            smallest = nanos if fit is None else fit.nanos(fit.min_tokens)
            if existing.scopes != scope_t or not smallest <= existing.amount <= nanos:
                raise HoldConflictError(
                    f"hold {hold_id!r} was reserved with other scopes or amount"
                )
            self._touch(existing, now)
            return existing.view()
        for hold in self.holds_.values():
            if hold.state is HoldState.HELD and set(hold.scopes) & set(scope_t):
                self._touch(hold, now)
        for scope, most in caps:  # requests in flight, before the budgets (429 before 402)
            live = self.live_holds(scope)
            if live >= most:
                raise ConcurrencyExceeded(scope=scope, limit=most, live=live)
        if fit is not None:
            nanos = self._fitted(scope_t, nanos, fit, now)
        windows: dict[str, int] = {}
        for scope in scope_t:
            limit, period = self.budgets_.get(scope, (None, Period()))
            key, _start, end = window_of(period, now)
            windows[scope] = key
            counter = self.counters.get((scope, key), Counter())
            if limit is not None and counter.spent + counter.reserved + nanos > limit:
                raise BudgetExceeded(
                    scope=scope,
                    limit=from_nanos(limit),
                    spent=from_nanos(counter.spent),
                    held=from_nanos(counter.reserved),
                    requested=from_nanos(nanos),
                    resets_at=end,
                )
        for scope, key in windows.items():
            self.counters.setdefault((scope, key), Counter()).reserved += nanos
            self.counters[(scope, key)].live += 1
        hold = MHold(
            hold_id, scope_t, windows, nanos, HoldState.HELD, now, now + max(1, to_us(ttl))
        )
        self.holds_[hold_id] = hold
        self.order.append(hold_id)
        remaining = []
        for scope, key in windows.items():
            limit = self.budgets_.get(scope, (None, Period()))[0]
            counter = self.counters[(scope, key)]
            left = None if limit is None else from_nanos(limit - counter.spent - counter.reserved)
            remaining.append((scope, left))
        return dataclasses.replace(hold.view(), remaining=tuple(remaining))

    def live_holds(self, scope: str) -> int:
        """The scope's live holds in all its windows (what a cap counts)."""
        return sum(c.live for (s, _), c in self.counters.items() if s == scope)

    async def sweep_scope(self, scope: str) -> None:
        """Expire the due holds on ``scope``, as a reserve on it does first."""
        now = self.now()
        for hold in self.holds_.values():
            if hold.state is HoldState.HELD and scope in hold.scopes:
                self._touch(hold, now)

    def _fitted(self, scopes: tuple[str, ...], nanos: int, fit: OutputFit, now: int) -> int:
        """The hold a fitted reserve tries: the full amount if the tightest budget has room
        for it, else the largest fitting one, else the smallest (which is then refused)."""
        rooms = []
        for scope in scopes:
            limit, period = self.budgets_.get(scope, (None, Period()))
            if limit is not None:
                counter = self.counters.get((scope, window_of(period, now)[0]), Counter())
                rooms.append(limit - counter.spent - counter.reserved)
        if not rooms or min(rooms) >= nanos:
            return nanos
        tokens = fit.tokens_within(min(rooms))
        return fit.nanos(fit.min_tokens if tokens is None else tokens)

    def _record(self, record: UsageRecord | None, now: int) -> None:
        if record is None or any(r.request_id == record.request_id for r in self.usage_):
            return
        stored = dataclasses.replace(record, created_at=from_us(now), response_context=None)
        self.usage_.append(stored)

    async def settle(
        self, hold_id: str, actual: Decimal, *, record: UsageRecord | None = None
    ) -> Hold:
        hold_id = validate_hold_id(hold_id)
        nanos = to_nanos(actual)
        _check_record(record)
        now = self.now()
        hold = self.holds_.get(hold_id)
        if hold is None:
            raise HoldNotFoundError(f"no hold {hold_id!r}")
        self._touch(hold, now)
        if hold.state is HoldState.SETTLED:
            if hold.charged != nanos:
                raise HoldConflictError(f"hold {hold_id!r} was settled at another amount")
            return hold.view()
        if hold.state is HoldState.RELEASED:
            return hold.view()
        late = hold.state is HoldState.EXPIRED
        for scope, key in hold.windows.items():
            counter = self.counters[(scope, key)]
            if not late:
                counter.reserved -= hold.amount
                counter.live -= 1
            counter.spent += nanos
        hold.state = HoldState.SETTLED
        hold.charged = nanos
        hold.late = late
        if not late:
            hold.ended_us = now
        self._record(record, now)
        self._remember(record, now)
        return hold.view()

    def _remember(self, record: UsageRecord | None, now: int) -> None:
        """A charging settle remembers its record's response context, per id and owner:
        ``tokens``, or ``max(stored + growth, tokens)`` over a live stored row."""
        context = record.response_context if record is not None else None
        if context is None:
            return
        for context_id in context.ids:
            stored = self.contexts.get((context_id, context.owner))
            tokens = context.tokens
            if stored is not None and stored[1] > now:
                tokens = min(max(stored[0] + context.growth, tokens), 2**53 - 1)
            self.contexts[(context_id, context.owner)] = (tokens, now + max(1, to_us(context.ttl)))

    async def release(self, hold_id: str, *, record: UsageRecord | None = None) -> Hold:
        hold_id = validate_hold_id(hold_id)
        _check_record(record)
        now = self.now()
        hold = self.holds_.get(hold_id)
        if hold is None:
            hold = MHold(hold_id, (), {}, 0, HoldState.RELEASED, now, now, ended_us=now)
            self.holds_[hold_id] = hold
            self.order.append(hold_id)
            self._record(record, now)
            return hold.view()
        self._touch(hold, now)
        if hold.state is HoldState.HELD:
            for scope, key in hold.windows.items():
                self.counters[(scope, key)].reserved -= hold.amount
                self.counters[(scope, key)].live -= 1
            hold.state = HoldState.RELEASED
            hold.ended_us = now
            self._record(record, now)
        return hold.view()

    async def extend(self, hold_id: str, *, ttl: float) -> Hold:
        hold_id = validate_hold_id(hold_id)
        ttl = validate_ttl(ttl)
        now = self.now()
        hold = self.holds_.get(hold_id)
        if hold is None:
            raise HoldNotFoundError(f"no hold {hold_id!r}")
        self._touch(hold, now)
        if hold.state is not HoldState.HELD:
            raise HoldClosedError(f"hold {hold_id!r} is {hold.state.value}")
        hold.expires_us = max(hold.expires_us, now + max(1, to_us(ttl)))
        return hold.view()

    async def get_hold(self, hold_id: str) -> Hold | None:
        hold = self.holds_.get(validate_hold_id(hold_id))
        return None if hold is None else hold.view()

    async def holds(self, *, live_only: bool = True, limit: int = 1000) -> list[Hold]:
        validate_limit(limit)
        out = [self.holds_[h].view() for h in reversed(self.order)]  # newest first
        if live_only:
            out = [h for h in out if h.live]
        return out[:limit]

    async def sweep(self) -> int:
        now = self.now()
        due = [h for h in self.holds_.values() if h.state is HoldState.HELD and now >= h.expires_us]
        for hold in due:
            self._expire(hold, now)
        for key in [k for k, (_, expires) in self.contexts.items() if now >= expires]:
            del self.contexts[key]
        oldest = from_us(now - to_us(DENIAL_RETENTION))
        for hour_reason in [k for k in self.denials_ if k[0] < oldest]:
            del self.denials_[hour_reason]
        return len(due)

    async def add_denials(self, counts: Mapping[tuple[datetime, str], int]) -> None:
        for hour, reason, count in validate_denials(counts):
            self.denials_[hour, reason] = self.denials_.get((hour, reason), 0) + count

    async def denials(self, *, since: datetime, until: datetime | None = None) -> list[DenialCount]:
        query = validate_denial_range(since, until)
        return [
            DenialCount(hour, reason, count)
            for (hour, reason), count in sorted(self.denials_.items())
            if since <= hour and (query.until is None or hour < query.until)
        ]

    async def check(self) -> list[str]:
        return self.invariants()

    # -- usage and keys ----------------------------------------------------------------
    async def usage(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        key: str | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> list[UsageRecord]:
        validate_limit(limit)
        query = validate_usage_filter(since, until, user, key, model)
        return select_usage(self.usage_, query)[:limit]

    async def usage_totals(
        self,
        *,
        group_by: Sequence[UsageGroup],
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        key: str | None = None,
        model: str | None = None,
    ) -> list[UsageTotal]:
        groups = validate_usage_groups(group_by)
        query = validate_usage_filter(since, until, user, key, model)
        return total_usage(self.usage_, groups, query)

    async def response_context(self, context_id: str, owner: str) -> int | None:
        context_id = validate_context_id(context_id)
        (owner,) = validate_scopes([owner])
        stored = self.contexts.get((context_id, owner))
        if stored is None or self.now() >= stored[1]:
            return None
        return stored[0]

    async def create_key(self, record: ApiKeyRecord) -> ApiKeyRecord:
        if record.key_id in self.keys or any(
            k.key_hash == record.key_hash for k in self.keys.values()
        ):
            raise ConfigurationError(f"API key {record.key_id!r} already exists")
        stored = dataclasses.replace(record, created_at=record.created_at or from_us(self.now()))
        self.keys[record.key_id] = stored
        self.key_order.append(record.key_id)
        self.key_epoch += 1
        return stored

    async def find_key(self, key_hash: str) -> ApiKeyRecord | None:
        return next((k for k in self.keys.values() if k.key_hash == key_hash), None)

    async def revoke_key(self, key_id: str) -> bool:
        key = self.keys.get(key_id)
        if key is None:
            return False
        self.keys[key_id] = dataclasses.replace(key, revoked=True)
        self.key_epoch += 1
        return True

    async def update_key(self, key_id: str, **limits: int | None) -> ApiKeyRecord | None:
        changes = validate_key_limits(limits)
        key = self.keys.get(key_id)
        if key is None:
            return None
        self.keys[key_id] = key = dataclasses.replace(key, **changes)  # type: ignore[arg-type]
        self.key_epoch += 1
        return key

    async def list_keys(self, *, user: str | None = None) -> list[ApiKeyRecord]:
        return [self.keys[k] for k in self.key_order if user is None or self.keys[k].user == user]

    # -- invariants ----------------------------------------------------------------------
    def invariants(self, *, swept: bool = False) -> list[str]:
        """I1–I11 on the model's own state; ``swept`` adds I5 (checked right after a sweep)."""
        problems: list[str] = []
        live: dict[tuple[str, int], int] = {}
        count: dict[tuple[str, int], int] = {}
        charged: dict[tuple[str, int], int] = {}
        now = self.now()
        for hold in self.holds_.values():
            if not all(isinstance(v, int) for v in (hold.amount, hold.charged)):
                problems.append(f"I11: hold {hold.hold_id} has non-integer money")
            if hold.scopes and set(hold.windows) != set(hold.scopes):
                problems.append(f"I8: hold {hold.hold_id} does not cover all its scopes")
            for scope, key in hold.windows.items():
                if hold.state is HoldState.HELD:
                    live[(scope, key)] = live.get((scope, key), 0) + hold.amount
                    count[(scope, key)] = count.get((scope, key), 0) + 1
                if hold.state is HoldState.SETTLED:
                    charged[(scope, key)] = charged.get((scope, key), 0) + hold.charged
            if hold.state is not HoldState.SETTLED and (hold.charged or hold.late):
                problems.append(f"I4: unsettled hold {hold.hold_id} carries a charge")
            if hold.state is HoldState.EXPIRED and (
                hold.ended_us is None or hold.ended_us < hold.expires_us
            ):
                problems.append(f"I6: hold {hold.hold_id} expired early")
            if swept and hold.state is HoldState.HELD and now >= hold.expires_us:
                problems.append(f"I5: hold {hold.hold_id} is live past its TTL after a sweep")
        for (scope, key), counter in self.counters.items():
            if counter.reserved != live.get((scope, key), 0):
                problems.append(f"I2: {scope}@{key} reserved {counter.reserved} != live holds")
            if counter.live != count.get((scope, key), 0):
                problems.append(f"I2: {scope}@{key} counts {counter.live} live holds, not so")
            if counter.spent != charged.get((scope, key), 0):
                problems.append(f"I3: {scope}@{key} spent {counter.spent} != settled charges")
            if counter.spent < 0 or counter.reserved < 0 or counter.live < 0:
                problems.append(f"I9: {scope}@{key} has a negative total")
        for key_ in set(live) | set(charged):
            if key_ not in self.counters:
                problems.append(f"I10: holds of {key_} have no counter")
        return problems

    def snapshot(self) -> dict[tuple[str, int], tuple[int, int]]:
        """Counters by (scope, window) for direct comparison in tests."""
        return {k: (c.spent, c.reserved) for k, c in self.counters.items()}


def _check_record(record: UsageRecord | None) -> None:
    """A record no store can hold is refused before anything happens (nothing stored)."""
    if validate_record(record) is not None:
        assert record is not None
        to_nanos(record.cost)
