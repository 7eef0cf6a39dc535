"""The ledger contract: value types and the ``Ledger`` protocol every backend implements.

Semantics (docs/ledger.md), shared by every backend and checked by one conformance suite:

* Money is ``Decimal`` USD here and integer nano-USD in storage; a float is refused.
* A budget is a scope string ``kind:id`` with a limit (``None`` = unlimited, spend is
  still counted) and a :class:`Period`. Counters are kept per period window, keyed by
  the window's start, so nothing ever has to be reset.
* ``reserve`` holds an amount against *all* its scopes or none. A scope without a budget
  is counted but never refuses. A refusal raises :class:`~gatewaykit.errors.BudgetExceeded`
  and stores nothing (a replay of a refused id is evaluated afresh).
* A hold is ``held`` until exactly one terminal transition: ``settled`` (charge the actual
  cost; a partial charge releases the rest, an overrun is charged and recorded),
  ``released`` (refund), or ``expired`` (its TTL passed). A settle of an expired hold is
  recorded as a late charge; a release of an unknown id leaves a tombstone.
* Every operation is idempotent by hold id; the same id with other parameters raises
  :class:`~gatewaykit.errors.HoldConflictError`.
* Time is the store's clock, never the caller's.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from types import TracebackType
from typing import Literal, Protocol, runtime_checkable

from gatewaykit.errors import ConfigurationError, InvalidScopeError
from gatewaykit.money import MAX_NANOS, parse_usd, to_nanos
from gatewaykit.usage import MAX_TOKENS

__all__ = [
    "ApiKeyRecord",
    "BudgetStatus",
    "DENIAL_RETENTION",
    "DenialCount",
    "DenialStore",
    "Hold",
    "HoldState",
    "MAX_LIMIT",
    "Ledger",
    "OutputFit",
    "Period",
    "RESPONSE_CONTEXT_TTL",
    "ResponseContext",
    "USAGE_GROUPS",
    "UsageFilter",
    "UsageGroup",
    "UsageRecord",
    "UsageTotal",
    "sort_totals",
    "validate_context_id",
    "validate_denial_range",
    "validate_denials",
    "validate_fit",
    "validate_hold_id",
    "validate_key_limits",
    "validate_limit",
    "validate_max_live",
    "validate_record",
    "validate_scopes",
    "validate_ttl",
    "validate_usage_filter",
    "validate_usage_groups",
    "whole_days",
]

_SCOPE = re.compile(r"^[a-z][a-z0-9_.-]{0,31}:[^\s]{1,200}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def validate_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    """Check scopes are ``kind:id`` strings; return them sorted and de-duplicated."""
    if isinstance(scopes, str):
        raise InvalidScopeError(f"scopes must be a list of strings, not the string {scopes!r}")
    if not scopes:
        raise InvalidScopeError("a hold needs at least one scope, e.g. ['user:alice']")
    for scope in scopes:
        if not isinstance(scope, str) or not _SCOPE.match(scope):
            raise InvalidScopeError(
                f"invalid scope {scope!r}: expected 'kind:id' such as 'user:alice' or 'key:k_1' "
                "(lower-case kind, no whitespace)"
            )
    return tuple(sorted(set(scopes)))


def validate_max_live(
    max_live: Mapping[str, int] | None, scopes: tuple[str, ...]
) -> tuple[tuple[str, int], ...]:
    """Caps on live holds: each a scope of the hold and a positive int; sorted by scope."""
    if not max_live:
        return ()
    if not isinstance(max_live, Mapping):
        raise ConfigurationError("max_live must map scopes to the most live holds they may have")
    for scope, most in max_live.items():
        if scope not in scopes:
            raise ConfigurationError(f"max_live names {scope!r}, which is not a scope of the hold")
        if isinstance(most, bool) or not isinstance(most, int) or not 0 < most < 2**31:
            raise ConfigurationError(f"max_live[{scope!r}] must be a positive int, not {most!r}")
    return tuple(sorted(max_live.items()))


def validate_hold_id(hold_id: str) -> str:
    if not isinstance(hold_id, str) or not hold_id or len(hold_id) > 255 or hold_id.isspace():
        raise ConfigurationError(f"a hold id must be a non-empty string of ≤255 chars: {hold_id!r}")
    return hold_id


def validate_ttl(ttl: float) -> float:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not (0 < ttl < 10**8):
        raise ConfigurationError(f"a hold TTL must be a positive number of seconds, got {ttl!r}")
    return float(ttl)


@dataclasses.dataclass(frozen=True, slots=True)
class Period:
    """How a budget's spend is windowed: never, every N seconds, or calendar day/week/month.

    Rolling periods are consecutive windows of ``seconds`` aligned to the Unix epoch;
    calendar periods are UTC (weeks start on Monday).
    """

    kind: Literal["none", "rolling", "day", "week", "month"] = "none"
    seconds: int | None = None

    def __post_init__(self) -> None:
        if self.kind == "rolling":
            if (
                isinstance(self.seconds, bool)
                or not isinstance(self.seconds, int)
                or self.seconds <= 0
            ):
                raise ConfigurationError("a rolling period needs a positive number of seconds")
        elif self.kind in ("none", "day", "week", "month"):
            if self.seconds is not None:
                raise ConfigurationError(f"a {self.kind} period takes no seconds")
        else:
            raise ConfigurationError(f"unknown period kind {self.kind!r}")

    @classmethod
    def parse(cls, text: str | int | None) -> Period:
        """``None``/``"none"``, ``"day"``, ``"week"``, ``"month"``, or a number of seconds."""
        if text is None:
            return cls()
        if isinstance(text, int) and not isinstance(text, bool):
            return cls("rolling", text)
        value = str(text).strip().lower()
        if value in ("none", "day", "week", "month"):
            return cls(value)  # type: ignore[arg-type]
        if value.isdigit() and int(value) > 0:
            return cls("rolling", int(value))
        raise ConfigurationError(
            f"invalid period {text!r}: use none, day, week, month or a number of seconds"
        )

    def __str__(self) -> str:
        return str(self.seconds) if self.kind == "rolling" else self.kind

    def window(self, now: datetime) -> tuple[datetime, datetime | None]:
        """The window containing ``now``: (start, end); ``end`` is None when it never ends."""
        now = now.astimezone(timezone.utc)
        if self.kind == "none":
            return _EPOCH, None
        if self.kind == "rolling":
            assert self.seconds is not None
            elapsed = int((now - _EPOCH).total_seconds())
            start = _EPOCH + timedelta(seconds=elapsed - elapsed % self.seconds)
            return start, start + timedelta(seconds=self.seconds)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.kind == "day":
            return day, day + timedelta(days=1)
        if self.kind == "week":
            start = day - timedelta(days=day.weekday())
            return start, start + timedelta(days=7)
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return start, end


class HoldState(str, enum.Enum):
    HELD = "held"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """A hold as stored. ``charged`` is what was settled (0 unless ``settled``).

    ``overrun`` is how much ``charged`` exceeded ``amount``; ``late`` marks a settle that
    arrived after the hold expired. A tombstone (release before reserve) is a ``released``
    hold with no scopes and amount 0.

    ``remaining`` is what a fresh ``reserve`` saw: per scope of the hold, in scope order,
    the amount left in its current window right after the hold (None when unlimited), so
    a caller can report headroom without reading the budgets again. It is a snapshot, not
    part of the hold's identity: it is empty on every other path and ignored by ``==``.
    """

    hold_id: str
    scopes: tuple[str, ...]
    amount: Decimal
    state: HoldState
    created_at: datetime
    expires_at: datetime
    charged: Decimal = Decimal(0)
    overrun: Decimal = Decimal(0)
    late: bool = False
    remaining: tuple[tuple[str, Decimal | None], ...] = dataclasses.field(default=(), compare=False)

    @property
    def live(self) -> bool:
        return self.state is HoldState.HELD


@dataclasses.dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A scope's budget in its current window. ``remaining`` is None when unlimited."""

    scope: str
    limit: Decimal | None
    period: Period
    spent: Decimal
    held: Decimal
    window_start: datetime
    resets_at: datetime | None

    @property
    def remaining(self) -> Decimal | None:
        if self.limit is None:
            return None
        return self.limit - self.spent - self.held


#: Most decimal places below a nano-USD an :class:`OutputFit` computes with.
_MAX_FIT_DIGITS = 40


def _units(value: Decimal, digits: int) -> int:
    """``value`` USD in units of 10^-(9 + digits) USD (exact: ``digits`` is large enough)."""
    sign, coefficient_digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    assert not sign
    coefficient = int("".join(map(str, coefficient_digits)))
    return coefficient * int(10 ** (exponent + 9 + digits))


@dataclasses.dataclass(frozen=True, slots=True)
class OutputFit:
    """A reserve that may hold fewer output tokens than asked, so the hold fits the budgets.

    A hold of ``n`` output tokens costs ``base + n × per_token`` USD rounded up to the
    nano-USD once (``base``: the prompt; both exact, unrounded). ``reserve(..., fit=f)``
    holds its ``amount`` — the cost of ``max_tokens`` — when that fits every budget, else
    the cost of the largest ``n ≥ min_tokens`` that fits all of them, decided in the same
    atomic step as the hold (two requests never fit into the same room); it refuses only
    when ``min_tokens`` does not fit. :meth:`tokens_held` reads ``n`` back from the amount
    held, also for a replay. The backends compute in integers of ``10^-(9 + digits)`` USD.
    """

    base: Decimal
    per_token: Decimal
    min_tokens: int
    max_tokens: int
    digits: int = dataclasses.field(init=False, repr=False, compare=False)
    base_units: int = dataclasses.field(init=False, repr=False, compare=False)
    token_units: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base, per_token = parse_usd(self.base), parse_usd(self.per_token)
        for name in ("min_tokens", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"OutputFit.{name} must be a non-negative int")
        if self.min_tokens > self.max_tokens:
            raise ConfigurationError("OutputFit.min_tokens must not exceed max_tokens")
        exponents = [v.as_tuple().exponent for v in (base, per_token) if v]
        digits = max([0, *(-9 - e for e in exponents if isinstance(e, int))])
        if digits > _MAX_FIT_DIGITS:
            raise ConfigurationError("OutputFit amounts have too many decimal places")
        object.__setattr__(self, "base", base)
        object.__setattr__(self, "per_token", per_token)
        object.__setattr__(self, "digits", digits)
        object.__setattr__(self, "base_units", _units(base, digits) if base else 0)
        object.__setattr__(self, "token_units", _units(per_token, digits) if per_token else 0)
        if self.nanos(self.max_tokens) > MAX_NANOS:
            raise ConfigurationError("OutputFit.max_tokens costs more than a ledger can hold")

    def nanos(self, tokens: int) -> int:
        """The hold for ``tokens`` output tokens, in nano-USD (rounded up once)."""
        scale: int = 10**self.digits
        return -(-(self.base_units + tokens * self.token_units) // scale)

    def tokens_within(self, room: int) -> int | None:
        """The most output tokens (at most ``max_tokens``) whose hold is ≤ ``room`` nano-USD;
        None when not even ``min_tokens`` fits."""
        spare = room * 10**self.digits - self.base_units
        if spare < 0:
            return None
        tokens = self.max_tokens if not self.token_units else spare // self.token_units
        tokens = min(tokens, self.max_tokens)
        return tokens if tokens >= self.min_tokens else None

    def tokens_held(self, amount: Decimal) -> int:
        """The output tokens a hold of ``amount`` USD (made with this fit) pays for."""
        tokens = self.tokens_within(to_nanos(amount))
        return self.min_tokens if tokens is None else tokens


def validate_fit(fit: OutputFit | None, amount: int) -> OutputFit | None:
    """A fit must price ``amount`` (nano-USD) as the hold of its ``max_tokens``."""
    if fit is None:
        return None
    if not isinstance(fit, OutputFit):
        raise ConfigurationError("fit must be an OutputFit or None")
    if fit.nanos(fit.max_tokens) != amount:
        raise ConfigurationError(
            "a fitted reserve's amount must be its OutputFit's cost of max_tokens"
        )
    return fit


#: How long a remembered response context lives (seconds): OpenAI keeps a stored
#: response for 30 days.
RESPONSE_CONTEXT_TTL = 30 * 24 * 3600
_MAX_CONTEXT_TOKENS = 2**53


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseContext:
    """The context a provider bills again when a later request continues a stored response.

    An OpenAI responses request naming ``previous_response_id`` (or ``conversation``) is
    billed for the whole stored context. The gateway remembers, per response id and per
    conversation id, how many tokens that is: ``tokens``. It rides on the
    :class:`UsageRecord` of the settle that charges the response and is written in the
    same transaction, only on that settle's transition (a replay writes nothing; so does
    a release). It belongs to ``owner`` (a scope such as ``user:alice``): a lookup by
    another owner finds nothing, exactly as for an unknown id.

    Each id named is stored as ``tokens``, or, when a live row of that id and owner is
    already stored, as ``max(stored + growth, tokens)``: a conversation grows by what
    each response adds to it (``growth``), also when several responses on it settle at
    once. ``ttl`` is seconds from the store clock's now; expired rows are ignored and
    pruned by ``sweep``.
    """

    owner: str
    tokens: int
    response_id: str | None = None
    conversation_id: str | None = None
    growth: int = 0
    ttl: float = RESPONSE_CONTEXT_TTL

    def __post_init__(self) -> None:
        (owner,) = validate_scopes([self.owner])
        object.__setattr__(self, "owner", owner)
        for name in ("tokens", "growth"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or not 0 <= value < _MAX_CONTEXT_TOKENS
            ):
                raise ConfigurationError(
                    f"ResponseContext.{name} must be a non-negative int of tokens, not {value!r}"
                )
        for name in ("response_id", "conversation_id"):
            value = getattr(self, name)
            if value is not None:
                validate_context_id(value)
        if self.response_id is None and self.conversation_id is None:
            raise ConfigurationError("a ResponseContext names a response id or a conversation id")
        object.__setattr__(self, "ttl", validate_ttl(self.ttl))

    @property
    def ids(self) -> tuple[str, ...]:
        """The ids this context is stored under (each once)."""
        ids = (self.response_id, self.conversation_id)
        return tuple(dict.fromkeys(i for i in ids if i is not None))


def validate_context_id(context_id: str) -> str:
    """A response or conversation id: a non-empty string of at most 255 characters."""
    if (
        not isinstance(context_id, str)
        or not context_id
        or len(context_id) > 255
        or context_id.isspace()
    ):
        raise ConfigurationError(
            f"a response or conversation id must be a non-empty string of ≤255 chars: "
            f"{context_id!r}"
        )
    return context_id


@dataclasses.dataclass(frozen=True, slots=True)
class UsageRecord:
    """One request's usage, written in the same transaction as its settle.

    ``response_context``, when set, is remembered by the settle that charges the request
    (see :class:`ResponseContext`); it is not part of the usage listing (``usage()``
    returns it as None).
    """

    request_id: str
    model: str
    endpoint: str
    status: str  # success | error | no_usage | incomplete
    usage_source: str  # provider | partial | estimated | none
    key_id: str | None = None
    user: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost: Decimal = Decimal(0)
    error: str | None = None
    latency_ms: int | None = None
    created_at: datetime | None = None  # set by the store
    response_context: ResponseContext | None = None


_RECORD_TEXT = ("request_id", "model", "endpoint", "status", "usage_source")
_RECORD_OPTIONAL_TEXT = ("key_id", "user", "error")
_RECORD_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


def validate_record(record: UsageRecord | None) -> UsageRecord | None:
    """Refuse a usage record no store can hold, before it is queued with other work.

    Token counts must be ints in ``[0, MAX_TOKENS]`` (settlement clamps provider reports
    with :func:`gatewaykit.usage.clamp_usage`). Checked on write rather than in
    ``UsageRecord`` itself, so records already stored always read back. The cost is
    checked by the backend as it converts it to nano-USD.
    """
    if record is None:
        return None
    if not isinstance(record, UsageRecord):
        raise ConfigurationError("record must be a UsageRecord")
    for name in _RECORD_TEXT:
        if not isinstance(getattr(record, name), str):
            raise ConfigurationError(f"UsageRecord.{name} must be a str")
    for name in _RECORD_OPTIONAL_TEXT:
        if not isinstance(getattr(record, name), (str, type(None))):
            raise ConfigurationError(f"UsageRecord.{name} must be a str or None")
    for name in _RECORD_TOKENS:
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
            raise ConfigurationError(
                f"UsageRecord.{name} must be an int from 0 to {MAX_TOKENS} "
                f"(gatewaykit.usage.MAX_TOKENS), got {value!r}; clamp provider reports with "
                "gatewaykit.usage.clamp_usage"
            )
    latency = record.latency_ms
    if latency is not None and (
        isinstance(latency, bool) or not isinstance(latency, int) or not -(2**63) <= latency < 2**63
    ):
        raise ConfigurationError(
            f"UsageRecord.latency_ms must be None or a 64-bit int, got {latency!r}"
        )
    return record


UsageGroup = Literal["user", "key", "model", "day"]
#: What ``Ledger.usage_totals`` can group by: the record's user, API key id, model, or
#: the UTC calendar day of its ``created_at``.
USAGE_GROUPS: tuple[UsageGroup, ...] = ("user", "key", "model", "day")


@dataclasses.dataclass(frozen=True, slots=True)
class UsageTotal:
    """The sum of the usage records of one group (see ``Ledger.usage_totals``).

    ``group`` holds the group's values in ``group_by`` order: a ``str`` (or None, for
    records without a user or key) for ``user``, ``key`` and ``model``, a
    :class:`datetime.date` (UTC) for ``day``.
    """

    group: tuple[str | date | None, ...]
    requests: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost: Decimal


@dataclasses.dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which usage records a listing or a total covers: ``since <= created_at < until``."""

    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    key: str | None = None
    model: str | None = None


#: The largest ``limit`` of a listing (``holds``, ``usage``): SQLite's and PostgreSQL's
#: ``LIMIT`` are signed 64-bit; no store holds that many rows anyway.
MAX_LIMIT = 2**63 - 1


def validate_limit(limit: int) -> int:
    """Check a listing's ``limit`` here, so a wrong one is never the store's overflow."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise ConfigurationError(f"limit must be an int from 1 to {MAX_LIMIT}, got {limit!r}")
    return limit


def validate_usage_filter(
    since: datetime | None,
    until: datetime | None,
    user: str | None,
    key: str | None,
    model: str | None,
) -> UsageFilter:
    """Check the filters of ``usage``/``usage_totals``; times must be timezone-aware."""
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and (not isinstance(moment, datetime) or moment.utcoffset() is None):
            raise ConfigurationError(
                f"{name} must be a timezone-aware datetime (e.g. datetime.now(timezone.utc)), "
                f"got {moment!r}"
            )
    if since is not None and until is not None and since > until:
        raise ConfigurationError(
            f"since ({since.isoformat()}) is after until ({until.isoformat()})"
        )
    for name, value in (("user", user), ("key", key), ("model", model)):
        if value is not None and not isinstance(value, str):
            raise ConfigurationError(f"the {name} filter must be a str or None, got {value!r}")
    return UsageFilter(since, until, user, key, model)


def validate_usage_groups(group_by: Sequence[str]) -> tuple[UsageGroup, ...]:
    """Check ``group_by``: each of ``user``, ``key``, ``model``, ``day`` at most once."""
    if isinstance(group_by, str):
        raise ConfigurationError(
            f"group_by must be a sequence such as ('day', 'model'), not the string {group_by!r}"
        )
    groups = tuple(group_by)
    for group in groups:
        if group not in USAGE_GROUPS:
            raise ConfigurationError(
                f"cannot group usage by {group!r}: use any of {', '.join(USAGE_GROUPS)}"
            )
    if len(set(groups)) != len(groups):
        raise ConfigurationError(f"group_by names a group twice: {groups!r}")
    return groups  # type: ignore[return-value]


def sort_totals(totals: list[UsageTotal]) -> list[UsageTotal]:
    """The order ``usage_totals`` returns: by each group value ascending, None last."""

    def order(total: UsageTotal) -> tuple[tuple[bool, str | date], ...]:
        return tuple((value is None, "" if value is None else value) for value in total.group)

    return sorted(totals, key=order)


def whole_days(query: UsageFilter) -> tuple[date | None, date | None] | None:
    """The UTC days lying wholly in ``[since, until)``, as ``(first, end)`` with ``end``
    exclusive and None for an open side; None when not one whole day fits.

    A backend answers these days from its daily rollup and reads the rest of the range
    (the partial days at its edges) from the records themselves.
    """
    first = end = None
    if query.since is not None:
        since = query.since.astimezone(timezone.utc)
        first = since.date()
        if since.timetz() != datetime.min.timetz().replace(tzinfo=timezone.utc):
            if first == date.max:
                return None
            first += timedelta(days=1)
    if query.until is not None:
        end = query.until.astimezone(timezone.utc).date()
    if first is not None and end is not None and first >= end:
        return None
    return first, end


#: How long the ledger keeps refusal counts (seconds): ``sweep`` prunes older hours.
DENIAL_RETENTION = 30 * 24 * 3600
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: The most one ``add_denials`` may add to one (hour, reason): far beyond any real flood,
#: so that sums stay well inside a signed 64-bit column.
_MAX_DENIALS = 2**40


@dataclasses.dataclass(frozen=True, slots=True)
class DenialCount:
    """How many requests were refused for ``reason`` in the UTC hour starting at ``hour``."""

    hour: datetime
    reason: str
    count: int


def validate_denials(counts: Mapping[tuple[datetime, str], int]) -> list[tuple[datetime, str, int]]:
    """Check ``add_denials``' counts; return them as sorted ``(hour in UTC, reason, count)``.

    An hour is a timezone-aware datetime on the hour; a reason is a short lower-case
    word (``auth``, ``budget``…); a count a positive int.
    """
    if not isinstance(counts, Mapping):
        raise ConfigurationError("denial counts must map (hour, reason) to a count")
    rows: list[tuple[datetime, str, int]] = []
    for key, count in counts.items():
        if not isinstance(key, tuple) or len(key) != 2:
            raise ConfigurationError(f"a denial count's key must be (hour, reason), not {key!r}")
        hour, reason = key
        if not isinstance(hour, datetime) or hour.utcoffset() is None:
            raise ConfigurationError(f"a denial hour must be a timezone-aware datetime: {hour!r}")
        hour = hour.astimezone(timezone.utc)
        if hour != hour.replace(minute=0, second=0, microsecond=0):
            raise ConfigurationError(f"a denial hour must start on the hour: {hour.isoformat()}")
        if not isinstance(reason, str) or not _REASON.match(reason):
            raise ConfigurationError(f"invalid denial reason {reason!r}: a short lower-case word")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= _MAX_DENIALS:
            raise ConfigurationError(
                f"a denial count must be an int from 1 to {_MAX_DENIALS}, got {count!r}"
            )
        rows.append((hour, reason, count))
    return sorted(rows)


def validate_denial_range(since: datetime, until: datetime | None) -> UsageFilter:
    """Check ``denials``' range: ``since`` is required, both timezone-aware."""
    if since is None:
        raise ConfigurationError("denials needs since, a timezone-aware datetime")
    return validate_usage_filter(since, until, None, None, None)


@dataclasses.dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A stored API key: never the key itself, only its SHA-256 hash and display prefix."""

    key_id: str
    key_hash: str = dataclasses.field(repr=False)
    prefix: str
    user: str
    team: str | None = None
    revoked: bool = False
    created_at: datetime | None = None
    expires_at: datetime | None = None
    allowed_models: tuple[str, ...] | None = None
    rpm: int | None = None
    #: Tokens per minute (estimates in flight + actual tokens settled; gatewaykit.ratelimit).
    tpm: int | None = None
    #: The most requests this key may have in flight at once (None: no cap).
    max_concurrent: int | None = None


#: The fields of an :class:`ApiKeyRecord` that ``Ledger.update_key`` may change.
KEY_LIMITS = ("rpm", "tpm", "max_concurrent")


def validate_key_limits(changes: dict[str, int | None]) -> dict[str, int | None]:
    """Check ``update_key``'s changes: known limit names, each a positive int or None."""
    if not changes:
        raise ConfigurationError("update_key needs at least one change")
    for name, value in changes.items():
        if name not in KEY_LIMITS:
            raise ConfigurationError(
                f"update_key cannot change {name!r}; it changes {', '.join(KEY_LIMITS)}"
            )
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigurationError(f"{name} must be a positive int or None, not {value!r}")
        if value is not None and not 1 <= value < 2**31:
            raise ConfigurationError(f"{name} must be from 1 to {2**31 - 1}, not {value}")
    return changes


@runtime_checkable
class Ledger(Protocol):
    """The budget store. Every method is a coroutine; every write is atomic and durable.

    Backends are async context managers (``async with open_ledger(url) as ledger``) and
    also offer ``open()`` / ``aclose()`` for hosts that manage lifetimes by hand.

    Optionally a backend offers ``key_epoch: int``, a cheap synchronous signal that
    increases whenever the ledger learns that any API key changed — its own
    ``create_key``/``revoke_key`` before they return, another process's as soon as the
    backend hears of it. It is not part of the protocol (read it with ``getattr``):
    ``StandaloneMode`` drops cached key lookups when it moves, and without it relies on
    ``key_cache_ttl`` alone.
    """

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Ledger:
        """``open()`` and return the ledger."""

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """``aclose()``."""

    # -- budgets -----------------------------------------------------------------------
    async def set_budget(
        self, scope: str, *, limit: Decimal | None, period: Period = ...
    ) -> BudgetStatus:
        """Create or change a budget; it applies to the current window at once."""

    async def delete_budget(self, scope: str) -> bool:
        """Remove a budget's limit; counters and history stay. False if there was none."""

    async def status(self, scope: str) -> BudgetStatus | None:
        """The scope's current window, or None if the ledger never saw the scope."""

    async def budgets(self) -> list[BudgetStatus]:
        """Every known scope's current window, sorted by scope."""

    # -- holds -------------------------------------------------------------------------
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
        """Hold ``amount`` on every scope or none; raises BudgetExceeded on refusal.

        ``max_live`` caps, per scope of the hold, its live holds (requests in flight) this
        one included: a scope at its cap refuses with ConcurrencyExceeded (checked before
        the budgets; the first such scope in sorted order). The count and the new hold are
        one atomic step, exact across every process sharing the store.

        With ``fit`` (see :class:`OutputFit`), a smaller hold that fits every budget is
        taken instead of a refusal; ``Hold.amount`` says what was held. A refusal then
        reports the first scope (sorted) where ``fit.min_tokens`` does not fit, requesting
        that smaller amount. A replay with a fit accepts any stored amount the fit could
        have held.

        A replay returns the stored hold (whatever its state since); a tombstone left by
        an earlier release is returned as is, so the caller must check ``hold.live``.
        Expired holds on the same scopes are reclaimed first.

        ``Hold.remaining`` is filled by reserve when the backend knows it (each scope's
        ``limit - spent - held`` in its current window right after this hold, None when
        unlimited); empty otherwise (replays may leave it empty).
        """

    async def settle(
        self, hold_id: str, actual: Decimal, *, record: UsageRecord | None = None
    ) -> Hold:
        """Charge ``actual`` and release the rest; write ``record`` in the same transaction.

        A settle after expiry is charged as a late charge. A replay returns the stored
        hold; a different ``actual`` for a settled hold raises HoldConflictError; a settle
        of a released hold returns it unchanged. Unknown ids raise HoldNotFoundError.
        """

    async def release(self, hold_id: str, *, record: UsageRecord | None = None) -> Hold:
        """Refund a live hold; a release of an unknown id leaves a tombstone."""

    async def extend(self, hold_id: str, *, ttl: float) -> Hold:
        """Move a live hold's expiry to now + ``ttl`` (never earlier than it was)."""

    async def get_hold(self, hold_id: str) -> Hold | None: ...

    async def holds(self, *, live_only: bool = True, limit: int = 1000) -> list[Hold]:
        """Holds, newest first."""

    async def sweep(self) -> int:
        """Expire every live hold past its TTL; return how many."""

    async def check(self) -> list[str]:
        """Invariant violations (I1–I11), each a readable sentence; empty when healthy."""

    # -- usage records -----------------------------------------------------------------
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
        """Up to ``limit`` usage records, newest first (by ``created_at``, then insertion).

        ``since`` is inclusive and ``until`` exclusive (``since <= created_at < until``),
        so consecutive ranges never count a record twice; both must be timezone-aware.
        ``user``, ``key`` (an API key id) and ``model`` match exactly. Filters combine.
        """

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
        """Request counts, token and exact cost sums of the records ``usage`` would match.

        One :class:`UsageTotal` per distinct combination of the ``group_by`` values (days
        in UTC), sorted by those values ascending with None last; an empty ``group_by``
        gives one grand total. No matching record gives an empty list.
        """

    async def response_context(self, context_id: str, owner: str) -> int | None:
        """The context tokens remembered for a response or conversation id and its owner.

        None when the id is unknown, expired, or belongs to another owner (the three are
        indistinguishable). Written by ``settle`` from ``UsageRecord.response_context``.
        """

    # -- API keys ------------------------------------------------------------------------
    async def create_key(self, record: ApiKeyRecord) -> ApiKeyRecord: ...

    async def find_key(self, key_hash: str) -> ApiKeyRecord | None: ...

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke; False if no such key."""

    async def update_key(self, key_id: str, **limits: int | None) -> ApiKeyRecord | None:
        """Set a key's limits (``rpm``, ``tpm``, ``max_concurrent``; None removes one);
        None if no such key.

        Like ``revoke_key``, it moves ``key_epoch`` so running gateways see it at once.
        """

    async def list_keys(self, *, user: str | None = None) -> list[ApiKeyRecord]: ...


@runtime_checkable
class DenialStore(Protocol):
    """Optional ledger capability: counts of refused requests per (UTC hour, reason), for
    the admin page (:class:`gatewaykit.denials.DenialCounter` writes them). Both built-in
    ledgers offer it; a ledger of your own need not — it is no part of :class:`Ledger`,
    and without it no refusals are counted.
    """

    async def add_denials(self, counts: Mapping[tuple[datetime, str], int]) -> None:
        """Add refused requests to the stored counts per (UTC hour, reason), atomically.

        Counts add up (several gateway processes flush into one store); hours older than
        :data:`DENIAL_RETENTION` are pruned by ``sweep``. Checked by
        :func:`validate_denials`.
        """

    async def denials(self, *, since: datetime, until: datetime | None = None) -> list[DenialCount]:
        """The stored counts of the hours starting at ``since <= hour < until``, sorted by
        hour then reason; both times timezone-aware."""
