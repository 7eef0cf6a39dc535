"""The in-process rate limiter: exact sliding 60-second windows in this process's memory.

One timestamp per admitted request (and one entry per request's tokens), so a burst at a
window edge cannot pass twice the limit. It is per process: N gateway processes admit up
to N times the limit between them — use :class:`~gatewaykit.ratelimit.RedisRateLimiter`
to share limits. It sits on every request's path, so it does the least it can: no lock
(one event loop), no task, no I/O.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from gatewaykit.ratelimit.base import WINDOW, LimitState, RateDecision, RateLimit

__all__ = ["InProcessRateLimiter"]

_PRUNE_EVERY = 1000  # checks between sweeps of idle scopes


class _Window:
    """One scope's counted requests and tokens."""

    __slots__ = ("counted", "requests", "tokens", "used")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()  # admission times, oldest first
        self.tokens: deque[tuple[float, str]] = deque()  # (admission time, request id)
        self.counted: dict[str, int] = {}  # request id -> tokens counted now
        self.used = 0  # sum of counted

    def expire(self, cutoff: float) -> None:
        requests, tokens = self.requests, self.tokens
        while requests and requests[0] <= cutoff:
            requests.popleft()
        while tokens and tokens[0][0] <= cutoff:
            self.used -= self.counted.pop(tokens.popleft()[1])

    def token_wait(self, need: int, now: float) -> float:
        """Seconds until ``need`` tokens have left the window."""
        freed = 0
        for at, request_id in self.tokens:
            freed += self.counted[request_id]
            if freed >= need:
                return at + WINDOW - now
        return WINDOW


class InProcessRateLimiter:
    """Sliding-window RPM and TPM counters by scope, in memory (the default limiter).

    Not thread-safe: one per event loop. ``clock`` is monotonic seconds.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._checks = 0

    async def acquire(
        self, request_id: str, limits: Sequence[RateLimit], tokens: int
    ) -> RateDecision:
        return self.check(request_id, limits, tokens)

    async def settle(self, request_id: str, limits: Sequence[RateLimit], tokens: int) -> None:
        for limit in limits:
            window = self._windows.get(limit.scope)
            if window is None or limit.tpm is None:
                continue
            counted = window.counted.get(request_id)
            if counted is not None:
                window.counted[request_id] = tokens
                window.used += tokens - counted

    def check(self, request_id: str, limits: Sequence[RateLimit], tokens: int) -> RateDecision:
        """:meth:`acquire` without the coroutine."""
        now = self._clock()
        cutoff = now - WINDOW
        self._checks += 1
        if self._checks % _PRUNE_EVERY == 0:
            self._prune(cutoff)
        requests: tuple[int, int, float] | None = None  # tightest: limit, room, reset
        token_state: tuple[int, int, float] | None = None
        wait = 0.0
        reason = ""
        windows = []
        for limit in limits:
            window = self._windows.get(limit.scope)
            if window is None:
                window = self._windows[limit.scope] = _Window()
            window.expire(cutoff)
            windows.append(window)
            rpm, tpm = limit.rpm, limit.tpm
            if rpm is not None:
                counted = window.requests
                room = rpm - len(counted)
                if room <= 0:
                    retry = counted[-room] + WINDOW - now
                    if retry > wait or not reason:
                        wait = retry
                        reason = (
                            f"rate limit of {rpm} requests per minute exceeded for {limit.scope}"
                        )
                if requests is None or room < requests[1]:
                    requests = (rpm, room, counted[0] + WINDOW - now if counted else WINDOW)
            if tpm is not None:
                room = tpm - window.used
                if tokens > room:
                    if tokens > tpm:
                        retry = WINDOW
                        why = (
                            f"this request's estimated {tokens} tokens exceed the limit of "
                            f"{tpm} tokens per minute for {limit.scope}; lower its max tokens"
                        )
                    else:
                        retry = window.token_wait(tokens - room, now)
                        why = f"rate limit of {tpm} tokens per minute exceeded for {limit.scope}"
                    if retry > wait or not reason:
                        wait, reason = retry, why
                if token_state is None or room < token_state[1]:
                    reset = window.tokens[0][0] + WINDOW - now if window.tokens else WINDOW
                    token_state = (tpm, room, reset)
        allowed = not reason
        if allowed:
            for limit, window in zip(limits, windows, strict=True):
                if limit.rpm is not None:
                    window.requests.append(now)
                if limit.tpm is not None:
                    window.tokens.append((now, request_id))
                    window.counted[request_id] = tokens
                    window.used += tokens
        return RateDecision(
            allowed=allowed,
            requests=None if requests is None else _state(requests, 1 if allowed else 0),
            tokens=None if token_state is None else _state(token_state, tokens if allowed else 0),
            retry_after=wait,
            reason=reason,
        )

    def _prune(self, cutoff: float) -> None:
        """Forget scopes with nothing left in their window."""
        idle = []
        for scope, window in self._windows.items():
            window.expire(cutoff)
            if not window.requests and not window.tokens:
                idle.append(scope)
        for scope in idle:
            del self._windows[scope]


def _state(tightest: tuple[int, int, float], taken: int) -> LimitState:
    limit, room, reset = tightest
    return LimitState(limit, max(room - taken, 0), reset)
