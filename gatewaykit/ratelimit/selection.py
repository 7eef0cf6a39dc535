"""Which rate limits apply to a request: its key's, its user's and its team's.

A key's own ``rpm``/``tpm`` apply, else the gateway's defaults; configured limits on
``user:<name>`` and ``team:<name>`` scopes apply to that user or team, and ``user:*`` /
``team:*`` to every user or team, each counted on its own. The limiter
(:class:`~gatewaykit.ratelimit.RateLimiter`) counts what this selects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gatewaykit.errors import ConfigurationError
from gatewaykit.ratelimit.base import RateLimit

if TYPE_CHECKING:
    from gatewaykit.ledger.base import ApiKeyRecord

__all__ = ["LimitSelector"]

_KEY_LIMITS_CACHE_SIZE = 10_000


class LimitSelector:
    """The limits of a request, from the key's record, the defaults and ``rate_limits``."""

    def __init__(
        self,
        *,
        default_rpm: int | None,
        default_tpm: int | None,
        rate_limits: Sequence[RateLimit],
    ) -> None:
        if default_rpm is not None and (isinstance(default_rpm, bool) or default_rpm < 1):
            raise ConfigurationError("default_rpm must be a positive int or None")
        if default_tpm is not None and (isinstance(default_tpm, bool) or default_tpm < 1):
            raise ConfigurationError("default_tpm must be a positive int or None")
        for limit in rate_limits:
            if not isinstance(limit, RateLimit) or not limit.scope.startswith(("user:", "team:")):
                raise ConfigurationError(
                    f"rate_limits takes RateLimit objects on user: or team: scopes, not {limit!r}"
                )
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.rate_limits = {limit.scope: limit for limit in rate_limits}
        self._any_scope_limit = bool(self.rate_limits)
        self._key_limits: dict[str, RateLimit] = {}

    def limits(
        self, identity: ApiKeyRecord | None, user: str | None, team: str | None
    ) -> tuple[RateLimit, ...]:
        """The limits that apply to a request: its key's, its user's, its team's."""
        limits: tuple[RateLimit, ...] = ()
        if identity is not None:
            rpm = identity.rpm if identity.rpm is not None else self.default_rpm
            tpm = identity.tpm if identity.tpm is not None else self.default_tpm
            if rpm is not None or tpm is not None:
                limit = self._key_limits.get(identity.key_id)
                if limit is None or limit.rpm != rpm or limit.tpm != tpm:
                    if len(self._key_limits) >= _KEY_LIMITS_CACHE_SIZE:
                        self._key_limits.clear()
                    limit = RateLimit(f"key:{identity.key_id}", rpm=rpm, tpm=tpm)
                    self._key_limits[identity.key_id] = limit
                limits = (limit,)
        if self._any_scope_limit:
            scopes = ([f"user:{user}"] if user else []) + ([f"team:{team}"] if team else [])
            for scope in scopes:
                limit = self.rate_limits.get(scope)
                if limit is None:
                    every = self.rate_limits.get(scope.split(":", 1)[0] + ":*")
                    if every is not None:
                        limit = RateLimit(scope, rpm=every.rpm, tpm=every.tpm)
                if limit is not None:
                    limits += (limit,)
        return limits
