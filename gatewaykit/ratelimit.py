"""Per-key requests-per-minute limits: an in-process sliding 60-second window.

The window is exact (one timestamp per admitted request), so a burst at a window edge
cannot pass twice the limit. It is per process: N gateway processes admit up to N times
the limit between them, as with every in-memory limiter; budgets, which live in the
shared ledger, are the hard cap.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["RateDecision", "RateLimiter"]

_WINDOW = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one request against a limit, with the headers to send either way."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: int  # Unix seconds when the oldest counted request leaves the window
    retry_after: int  # seconds to wait before a retry can pass (0 when allowed)

    @property
    def headers(self) -> dict[str, str]:
        headers = {
            "x-ratelimit-limit": str(self.limit),
            "x-ratelimit-remaining": str(self.remaining),
            "x-ratelimit-reset": str(self.reset_at),
        }
        if not self.allowed:
            headers["retry-after"] = str(self.retry_after)
        return headers


class RateLimiter:
    """Sliding-window RPM counters by key. Not thread-safe; one per event loop is enough."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall_clock
        self._hits: dict[str, deque[float]] = {}
        self._calls = 0

    def hit(self, key: str, limit: int) -> RateDecision:
        """Count one request for ``key`` if it fits in ``limit`` per minute."""
        now = self._clock()
        window = self._hits.setdefault(key, deque())
        cutoff = now - _WINDOW
        while window and window[0] <= cutoff:
            window.popleft()
        allowed = len(window) < limit
        if allowed:
            window.append(now)
        oldest = window[0] if window else now
        wait = max(oldest + _WINDOW - now, 0.0)
        reset_at = math.ceil(self._wall() + wait)
        self._calls += 1
        if self._calls % 1000 == 0:
            self._prune(cutoff)
        return RateDecision(
            allowed=allowed,
            limit=limit,
            remaining=max(limit - len(window), 0),
            reset_at=reset_at,
            retry_after=0 if allowed else max(math.ceil(wait), 1),
        )

    def _prune(self, cutoff: float) -> None:
        for key in [k for k, w in self._hits.items() if not w or w[-1] <= cutoff]:
            del self._hits[key]
