"""Rate limits per key, user and team: requests and tokens per sliding minute.

:class:`InProcessRateLimiter` (the default) counts in this process;
:class:`RedisRateLimiter` (``pip install 'gatewaykit[redis]'``, imported lazily) shares
the counts between any number of gateway processes. Both implement :class:`RateLimiter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewaykit.ratelimit.base import (
    WINDOW,
    LimitState,
    RateDecision,
    RateLimit,
    RateLimiter,
    UnavailablePolicy,
    format_duration,
)
from gatewaykit.ratelimit.inprocess import InProcessRateLimiter

if TYPE_CHECKING:
    from gatewaykit.ratelimit.redis import RedisRateLimiter

__all__ = [
    "WINDOW",
    "InProcessRateLimiter",
    "LimitState",
    "RateDecision",
    "RateLimit",
    "RateLimiter",
    "RedisRateLimiter",
    "UnavailablePolicy",
    "format_duration",
]


def __getattr__(name: str) -> Any:
    if name == "RedisRateLimiter":  # redis-py is an optional extra
        from gatewaykit.ratelimit.redis import RedisRateLimiter

        return RedisRateLimiter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
