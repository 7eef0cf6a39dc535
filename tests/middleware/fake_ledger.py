"""A tiny in-memory ledger for the middleware tests (no periods, no persistence).

Used until/unless SQLiteLedger is available; it follows the Ledger protocol's semantics
closely enough for the request path: all-or-none reserve, one terminal transition,
records written with the settle/release, check() of the counters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from gatewaykit.errors import (
    BudgetExceeded,
    HoldClosedError,
    HoldConflictError,
    HoldNotFoundError,
    LedgerUnavailableError,
)
from gatewaykit.ledger.base import (
    ApiKeyRecord,
    BudgetStatus,
    DenialCount,
    Hold,
    HoldState,
    OutputFit,
    Period,
    UsageGroup,
    UsageRecord,
    UsageTotal,
    validate_denials,
    validate_scopes,
    validate_usage_filter,
    validate_usage_groups,
)
from tests.ledger.model import select_usage, total_usage

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class FakeLedger:
    def __init__(self) -> None:
        self.limits: dict[str, Decimal | None] = {}
        self.spent: dict[str, Decimal] = {}
        self.held: dict[str, Decimal] = {}
        self.hold_rows: dict[str, Hold] = {}
        self.records: list[UsageRecord] = []
        self.keys: dict[str, ApiKeyRecord] = {}
        self.extends = 0
        #: Bumped by every key change, as the real backends' key_epoch.
        self.key_epoch = 0
        self.down = False
        self.calls: list[str] = []
        #: Remembered response contexts (no TTL here): (id, owner) -> tokens.
        self.contexts: dict[tuple[str, str], int] = {}
        #: Refusals per (UTC hour, reason), kept forever here.
        self.denial_counts: dict[tuple[datetime, str], int] = {}

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> FakeLedger:
        return self

    async def __aexit__(self, *exc: object) -> None: ...

    def _guard(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise LedgerUnavailableError("fake ledger is down")

    async def set_budget(
        self, scope: str, *, limit: Decimal | None, period: Period | None = None
    ) -> BudgetStatus:
        self.limits[scope] = limit
        status = await self.status(scope)
        assert status is not None
        return status

    async def delete_budget(self, scope: str) -> bool:
        return self.limits.pop(scope, None) is not None

    async def status(self, scope: str) -> BudgetStatus | None:
        self._guard("status")
        if scope not in self.limits and scope not in self.spent:
            return None
        return BudgetStatus(
            scope=scope,
            limit=self.limits.get(scope),
            period=Period(),
            spent=self.spent.get(scope, Decimal(0)),
            held=self.held.get(scope, Decimal(0)),
            window_start=_EPOCH,
            resets_at=None,
        )

    async def budgets(self) -> list[BudgetStatus]:
        return [s for s in [await self.status(k) for k in sorted(self.limits)] if s]

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
        if fit is not None or max_live:
            raise NotImplementedError("the fake ledger neither fits holds nor caps them")
        self._guard("reserve")
        scopes = validate_scopes(scopes)
        if hold_id in self.hold_rows:
            return self.hold_rows[hold_id]
        for scope in scopes:
            limit = self.limits.get(scope)
            spent = self.spent.get(scope, Decimal(0))
            held = self.held.get(scope, Decimal(0))
            if limit is not None and spent + held + amount > limit:
                raise BudgetExceeded(
                    scope=scope,
                    limit=limit,
                    spent=spent,
                    held=held,
                    requested=amount,
                    resets_at=None,
                )
        for scope in scopes:
            self.held[scope] = self.held.get(scope, Decimal(0)) + amount
            self.spent.setdefault(scope, Decimal(0))
        now = datetime.now(timezone.utc)
        hold = Hold(hold_id, scopes, amount, HoldState.HELD, now, now + timedelta(seconds=ttl))
        self.hold_rows[hold_id] = hold
        return dataclasses.replace(hold, remaining=tuple(self._remaining(s) for s in scopes))

    def _remaining(self, scope: str) -> tuple[str, Decimal | None]:
        limit = self.limits.get(scope)
        if limit is None:
            return scope, None
        return scope, limit - self.spent.get(scope, Decimal(0)) - self.held[scope]

    async def settle(
        self, hold_id: str, actual: Decimal, *, record: UsageRecord | None = None
    ) -> Hold:
        self._guard("settle")
        hold = self.hold_rows.get(hold_id)
        if hold is None:
            raise HoldNotFoundError(hold_id)
        if hold.state is HoldState.SETTLED:
            if hold.charged != actual:
                raise HoldConflictError(hold_id)
            return hold
        if hold.state is not HoldState.HELD:
            return hold
        for scope in hold.scopes:
            self.held[scope] -= hold.amount
            self.spent[scope] += actual
        hold = dataclasses.replace(
            hold,
            state=HoldState.SETTLED,
            charged=actual,
            overrun=max(actual - hold.amount, Decimal(0)),
        )
        self.hold_rows[hold_id] = hold
        if record is not None:
            self.records.append(record)
            self._remember(record)
        return hold

    def _remember(self, record: UsageRecord) -> None:
        context = record.response_context
        if context is None:
            return
        for context_id in context.ids:
            stored = self.contexts.get((context_id, context.owner))
            grown = context.tokens if stored is None else stored + context.growth
            self.contexts[(context_id, context.owner)] = max(grown, context.tokens)

    async def response_context(self, context_id: str, owner: str) -> int | None:
        self._guard("response_context")
        return self.contexts.get((context_id, owner))

    async def release(self, hold_id: str, *, record: UsageRecord | None = None) -> Hold:
        self._guard("release")
        hold = self.hold_rows.get(hold_id)
        if hold is None:
            now = datetime.now(timezone.utc)
            hold = Hold(hold_id, (), Decimal(0), HoldState.RELEASED, now, now)
            self.hold_rows[hold_id] = hold
            if record is not None:  # as the real ledgers: a tombstone keeps its record
                self.records.append(record)
            return hold
        if hold.state is not HoldState.HELD:
            return hold
        for scope in hold.scopes:
            self.held[scope] -= hold.amount
        hold = dataclasses.replace(hold, state=HoldState.RELEASED)
        self.hold_rows[hold_id] = hold
        if record is not None:
            self.records.append(record)
        return hold

    async def extend(self, hold_id: str, *, ttl: float) -> Hold:
        self._guard("extend")
        hold = self.hold_rows.get(hold_id)
        if hold is None:
            raise HoldNotFoundError(hold_id)
        if not hold.live:
            raise HoldClosedError(hold_id)
        self.extends += 1
        expires = max(hold.expires_at, datetime.now(timezone.utc) + timedelta(seconds=ttl))
        hold = dataclasses.replace(hold, expires_at=expires)
        self.hold_rows[hold_id] = hold
        return hold

    async def get_hold(self, hold_id: str) -> Hold | None:
        return self.hold_rows.get(hold_id)

    async def holds(self, *, live_only: bool = True, limit: int = 1000) -> list[Hold]:
        rows = [h for h in self.hold_rows.values() if h.live or not live_only]
        return rows[::-1][:limit]

    async def sweep(self) -> int:
        return 0

    async def add_denials(self, counts: Mapping[tuple[datetime, str], int]) -> None:
        self._guard("add_denials")
        for hour, reason, count in validate_denials(counts):
            key = (hour, reason)
            self.denial_counts[key] = self.denial_counts.get(key, 0) + count

    async def denials(self, *, since: datetime, until: datetime | None = None) -> list[DenialCount]:
        self._guard("denials")
        return [
            DenialCount(hour, reason, count)
            for (hour, reason), count in sorted(self.denial_counts.items())
            if since <= hour and (until is None or hour < until)
        ]

    async def check(self) -> list[str]:
        problems = []
        for scope, held in self.held.items():
            live = sum(
                (h.amount for h in self.hold_rows.values() if h.live and scope in h.scopes),
                Decimal(0),
            )
            if held != live:
                problems.append(f"{scope}: held {held} != live holds {live}")
            if held < 0:
                problems.append(f"{scope}: negative held")
        for scope, spent in self.spent.items():
            charged = sum(
                (
                    h.charged
                    for h in self.hold_rows.values()
                    if h.state is HoldState.SETTLED and scope in h.scopes
                ),
                Decimal(0),
            )
            if spent != charged:
                problems.append(f"{scope}: spent {spent} != charges {charged}")
        return problems

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
        query = validate_usage_filter(since, until, user, key, model)
        return select_usage(self.records, query)[:limit]

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
        query = validate_usage_filter(since, until, user, key, model)
        return total_usage(self.records, validate_usage_groups(group_by), query)

    async def create_key(self, record: ApiKeyRecord) -> ApiKeyRecord:
        self.keys[record.key_hash] = record
        self.key_epoch += 1
        return record

    async def find_key(self, key_hash: str) -> ApiKeyRecord | None:
        self._guard("find_key")
        return self.keys.get(key_hash)

    async def revoke_key(self, key_id: str) -> bool:
        for digest, record in self.keys.items():
            if record.key_id == key_id:
                self.keys[digest] = dataclasses.replace(record, revoked=True)
                self.key_epoch += 1
                return True
        return False

    async def update_key(self, key_id: str, **limits: int | None) -> ApiKeyRecord | None:
        for digest, record in self.keys.items():
            if record.key_id == key_id:
                self.keys[digest] = updated = dataclasses.replace(record, **limits)  # type: ignore[arg-type]
                self.key_epoch += 1
                return updated
        return None

    async def list_keys(self, *, user: str | None = None) -> list[ApiKeyRecord]:
        return [r for r in self.keys.values() if user is None or r.user == user]
