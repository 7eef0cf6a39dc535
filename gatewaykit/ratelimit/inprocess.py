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

from gatewaykit.ratelimit.base import WINDOW, RateDecision, RateLimit, new_decision, new_state

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
        return WINDOW  # pragma: no cover - never asked for more than is counted


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
        # On every limited request's path: written for few bytecodes, not for brevity.
        now = self._clock()
        cutoff = now - WINDOW
        self._checks += 1
        if self._checks % _PRUNE_EVERY == 0:
            self._prune(cutoff)
        windows = self._windows
        # The tightest limit of each kind: limit (0: none applied), room, reset.
        rpm_at = room_r = tpm_at = room_t = 0
        reset_r = reset_t = WINDOW
        wait = 0.0
        reason = ""
        for limit in limits:
            window = windows.get(limit.scope)
            if window is None:
                window = windows[limit.scope] = _Window()
            rpm, tpm = limit.rpm, limit.tpm
            if rpm is not None:
                counted = window.requests
                while counted and counted[0] <= cutoff:
                    counted.popleft()
                room = rpm - len(counted)
                if room <= 0:
                    retry = counted[-room] + WINDOW - now
                    if retry > wait or not reason:
                        wait = retry
                        reason = (
                            f"rate limit of {rpm} requests per minute exceeded for {limit.scope}"
                        )
                if not rpm_at or room < room_r:
                    rpm_at, room_r = rpm, room
                    reset_r = counted[0] + WINDOW - now if counted else WINDOW
            if tpm is not None:
                entries = window.tokens
                if entries and entries[0][0] <= cutoff:
                    window.expire(cutoff)
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
                if not tpm_at or room < room_t:
                    tpm_at, room_t = tpm, room
                    reset_t = entries[0][0] + WINDOW - now if entries else WINDOW
        if reason:  # refused: nothing counted; the room is what it was
            return new_decision((
                False,
                new_state((rpm_at, room_r if room_r > 0 else 0, reset_r)) if rpm_at else None,
                new_state((tpm_at, room_t if room_t > 0 else 0, reset_t)) if tpm_at else None,
                wait,
                reason,
            ))  # fmt: skip
        for limit in limits:
            window = windows[limit.scope]
            if limit.rpm is not None:
                window.requests.append(now)
            if limit.tpm is not None:
                window.tokens.append((now, request_id))
                window.counted[request_id] = tokens
                window.used += tokens
        room_t -= tokens
        return new_decision((
            True,
            new_state((rpm_at, room_r - 1, reset_r)) if rpm_at else None,
            new_state((tpm_at, room_t if room_t > 0 else 0, reset_t)) if tpm_at else None,
            0.0,
            "",
        ))  # fmt: skip

    async def settle(self, request_id: str, limits: Sequence[RateLimit], tokens: int) -> None:
        for limit in limits:
            window = self._windows.get(limit.scope)
            if window is None or limit.tpm is None:
                continue
            counted = window.counted.get(request_id)
            if counted is not None:
                window.counted[request_id] = tokens
                window.used += tokens - counted

    def _prune(self, cutoff: float) -> None:
        """Forget scopes with nothing left in their window."""
        idle = []
        for scope, window in self._windows.items():
            window.expire(cutoff)
            if not window.requests and not window.tokens:
                idle.append(scope)
        for scope in idle:
            del self._windows[scope]
