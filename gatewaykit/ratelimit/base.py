"""What every rate limiter shares: the limits, the decision, its headers, the protocol.

Limits are per scope (``key:<id>``, ``user:<name>``, ``team:<name>``) and per sliding
60-second window: at most ``rpm`` requests admitted, and at most ``tpm`` tokens counted,
in any 60 seconds. A request's tokens are counted at its admission: its estimate (prompt
estimate plus output cap) while it is in flight, replaced by its actual tokens when it
settles. docs/rate-limits.md states the semantics and the worst-case overshoot.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, Protocol, runtime_checkable

from gatewaykit.errors import ConfigurationError

__all__ = [
    "WINDOW",
    "LimitState",
    "RateDecision",
    "RateLimit",
    "RateLimiter",
    "UnavailablePolicy",
    "format_duration",
]

#: The window every limit counts over, in seconds.
WINDOW = 60.0

#: What a limiter does while its store is unreachable: admit (``fail_open``) or answer 503.
UnavailablePolicy = Literal["fail_open", "fail_closed"]


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimit:
    """The per-minute limits of one scope; None is no limit of that kind.

    In :class:`~gatewaykit.StandaloneMode`'s ``rate_limits``, the scope ``user:*`` (or
    ``team:*``) stands for every user (team), each with a window of its own.
    """

    scope: str
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.scope, str) or ":" not in self.scope:
            raise ConfigurationError(
                f"RateLimit scope must look like 'kind:id', not {self.scope!r}"
            )
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigurationError(f"RateLimit {name} must be a positive int or None")


class LimitState(NamedTuple):
    """One dimension (requests or tokens) of the tightest limit that applied."""

    limit: int
    remaining: int
    reset: float  # seconds until the oldest counted entry leaves the window


class RateDecision(NamedTuple):
    """The outcome of one request against its limits, with the headers to send either way.

    ``requests`` and ``tokens`` describe the limit with the least room left among those
    that applied (None when no limit of that kind applied, or the store was unreachable).
    ``retry_after`` is the wait before the request could pass (0 when allowed).
    """

    allowed: bool
    requests: LimitState | None = None
    tokens: LimitState | None = None
    retry_after: float = 0.0
    reason: str = ""

    @property
    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers, plus ``Retry-After`` when refused."""
        headers: dict[str, str] = {}
        requests, tokens = self.requests, self.tokens
        if requests is not None:
            limit, remaining, reset = requests
            headers["x-ratelimit-limit-requests"] = str(limit)
            headers["x-ratelimit-remaining-requests"] = str(remaining)
            headers["x-ratelimit-reset-requests"] = (
                _DURATIONS[math.ceil(reset)] if 0 <= reset <= WINDOW else format_duration(reset)
            )
        if tokens is not None:
            limit, remaining, reset = tokens
            headers["x-ratelimit-limit-tokens"] = str(limit)
            headers["x-ratelimit-remaining-tokens"] = str(remaining)
            headers["x-ratelimit-reset-tokens"] = (
                _DURATIONS[math.ceil(reset)] if 0 <= reset <= WINDOW else format_duration(reset)
            )
        if not self.allowed:
            headers["retry-after"] = str(max(math.ceil(self.retry_after), 1))
            headers["retry-after-ms"] = str(max(math.ceil(self.retry_after * 1000), 1))
        return headers


# A decision is made per limited request: these skip NamedTuple's Python-level __new__.
# Every field must be given.
new_state = functools.partial(tuple.__new__, LimitState)
new_decision = functools.partial(tuple.__new__, RateDecision)


@runtime_checkable
class RateLimiter(Protocol):
    """Counts requests and tokens per scope; admits a request only if every limit has room.

    Implementations: :class:`~gatewaykit.ratelimit.InProcessRateLimiter` (one process)
    and :class:`~gatewaykit.ratelimit.RedisRateLimiter` (any number of processes).
    """

    async def acquire(
        self, request_id: str, limits: Sequence[RateLimit], tokens: int
    ) -> RateDecision:
        """Admit ``request_id`` (estimated at ``tokens``) against all ``limits`` or none.

        Admitted, it counts as one request on every limit with an ``rpm`` and as
        ``tokens`` on every limit with a ``tpm``. Refused, nothing is counted.
        """

    async def settle(self, request_id: str, limits: Sequence[RateLimit], tokens: int) -> None:
        """Replace an admitted request's estimate with the ``tokens`` it actually used
        (0 when it was refused after admission); a no-op once it left the window."""


def format_duration(seconds: float) -> str:
    """Whole seconds, rounded up, as OpenAI writes durations (Go style): ``1s``, ``6m0s``."""
    whole = math.ceil(seconds) if seconds > 0 else 0
    if whole < _SHORT:
        return _DURATIONS[whole]
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


_SHORT = int(WINDOW) + 1  # every duration a window can produce, formatted once
_DURATIONS = tuple(f"{s}s" if s < 60 else f"{s // 60}m{s % 60}s" for s in range(_SHORT))
