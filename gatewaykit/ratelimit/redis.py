"""The Redis rate limiter: one sliding window per scope, shared by every gateway process.

Each check is one Lua script (``EVALSHA``: one round trip), atomic on the Redis server and
timed by the server's clock, so any number of processes on any number of machines admit
exactly what one process would. Per scope it keeps a sorted set of admitted request ids
(RPM), a sorted set and a hash of counted tokens with their running sum (TPM); every key
expires one window after its last admission, so idle scopes cost nothing.

A Redis outage follows ``on_unavailable``: ``fail_open`` (the default) admits without a
limit, ``fail_closed`` answers 503. Either way it is logged (once per outage, and when
Redis answers again) and counted in :attr:`RedisRateLimiter.unavailable`. After a failure
the limiter does not try Redis again for ``retry_interval`` seconds, so a dead server
costs requests no connection attempts. Requires ``gatewaykit[redis]`` (redis-py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gatewaykit.errors import ConfigurationError, ErrorKind, RequestRejected
from gatewaykit.ratelimit.base import (
    WINDOW,
    LimitState,
    RateDecision,
    RateLimit,
    UnavailablePolicy,
)
from gatewaykit.resource import AsyncResource

__all__ = ["RedisRateLimiter"]

logger = logging.getLogger("gatewaykit.ratelimit")

_WINDOW_MS = int(WINDOW * 1000)
_REASONS = ("requests per minute", "tokens per minute", "too large")

# KEYS: 4 per limit (admitted requests, token entries, tokens by request, token sum).
# ARGV: request id, window ms, estimated tokens, then per limit its rpm and tpm (0: none).
# Returns "allowed refusing-limit(1-based) reason retry-ms rpm requests-room
# requests-reset-ms tpm tokens-room tokens-reset-ms" (the tightest limit of each kind; rpm
# or tpm 0 when none applied): one string, which redis-py parses far faster than a list.
_ACQUIRE = """
local id, window, want = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local cutoff = now - window
local refused, reason, wait = 0, 0, 0
local rpm_t, rroom, rreset, tpm_t, troom, treset = 0, 0, 0, 0, 0, 0
for i = 0, #KEYS / 4 - 1 do
  local rk, tk, hk, sk = KEYS[4*i+1], KEYS[4*i+2], KEYS[4*i+3], KEYS[4*i+4]
  local rpm, tpm = tonumber(ARGV[4+2*i]), tonumber(ARGV[5+2*i])
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', rk, '-inf', cutoff)
    local used = redis.call('ZCARD', rk)
    local room, reset = rpm - used, window
    if used > 0 then
      reset = tonumber(redis.call('ZRANGE', rk, 0, 0, 'WITHSCORES')[2]) + window - now
    end
    if room <= 0 then
      local nth = redis.call('ZRANGE', rk, used - rpm, used - rpm, 'WITHSCORES')
      local retry = tonumber(nth[2]) + window - now
      if refused == 0 or retry > wait then refused, reason, wait = i + 1, 1, retry end
    end
    if rpm_t == 0 or room < rroom then rpm_t, rroom, rreset = rpm, room, reset end
  end
  if tpm > 0 then
    local gone = redis.call('ZRANGEBYSCORE', tk, '-inf', cutoff)
    if #gone > 0 then
      local freed = 0
      for _, member in ipairs(gone) do
        freed = freed + (tonumber(redis.call('HGET', hk, member)) or 0)
        redis.call('HDEL', hk, member)
      end
      redis.call('ZREMRANGEBYSCORE', tk, '-inf', cutoff)
      redis.call('DECRBY', sk, freed)
    end
    local used = math.max(tonumber(redis.call('GET', sk) or '0'), 0)
    local room, reset = tpm - used, window
    local oldest = redis.call('ZRANGE', tk, 0, 0, 'WITHSCORES')
    if #oldest > 0 then reset = tonumber(oldest[2]) + window - now end
    if want > room then
      local retry, why = window, 3
      if want <= tpm then
        why = 2
        local freed = 0
        local entries = redis.call('ZRANGE', tk, 0, -1, 'WITHSCORES')
        for j = 1, #entries, 2 do
          freed = freed + (tonumber(redis.call('HGET', hk, entries[j])) or 0)
          if freed >= want - room then
            retry = tonumber(entries[j+1]) + window - now
            break
          end
        end
      end
      if refused == 0 or retry > wait then refused, reason, wait = i + 1, why, retry end
    end
    if tpm_t == 0 or room < troom then tpm_t, troom, treset = tpm, room, reset end
  end
end
if refused == 0 then
  for i = 0, #KEYS / 4 - 1 do
    local rk, tk, hk, sk = KEYS[4*i+1], KEYS[4*i+2], KEYS[4*i+3], KEYS[4*i+4]
    if tonumber(ARGV[4+2*i]) > 0 then
      redis.call('ZADD', rk, now, id)
      redis.call('PEXPIRE', rk, window)
    end
    if tonumber(ARGV[5+2*i]) > 0 then
      redis.call('ZADD', tk, now, id)
      redis.call('HSET', hk, id, want)
      redis.call('INCRBY', sk, want)
      for _, key in ipairs({tk, hk, sk}) do redis.call('PEXPIRE', key, window) end
    end
  end
end
return string.format('%d %d %d %d %d %d %d %d %d %d', refused == 0 and 1 or 0, refused,
                     reason, wait, rpm_t, rroom, rreset, tpm_t, troom, treset)
"""

# KEYS: 2 per limit with a tpm (tokens by request, token sum). ARGV: request id, tokens.
_SETTLE = """
for i = 1, #KEYS, 2 do
  local counted = redis.call('HGET', KEYS[i], ARGV[1])
  if counted then
    redis.call('HSET', KEYS[i], ARGV[1], ARGV[2])
    redis.call('INCRBY', KEYS[i+1], tonumber(ARGV[2]) - tonumber(counted))
  end
end
return 0
"""


class RedisRateLimiter(AsyncResource):
    """Rate limits shared through one Redis server (or primary).

    Give it a ``redis.asyncio.Redis`` client you manage, or use :meth:`from_url` and
    ``async with`` it (or call :meth:`aclose`) to close the client it made. Keys start
    with ``prefix``; all of one check's keys must live on one server (Redis Cluster is
    not supported).
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "gatewaykit:rl:",
        on_unavailable: UnavailablePolicy = "fail_open",
        retry_interval: float = 1.0,
    ) -> None:
        if on_unavailable not in ("fail_open", "fail_closed"):
            raise ConfigurationError(
                f"on_unavailable must be fail_open or fail_closed, not {on_unavailable!r}"
            )
        if not retry_interval >= 0:
            raise ConfigurationError("retry_interval must be ≥ 0 seconds")
        self.client = client
        self.prefix = prefix
        self.on_unavailable: UnavailablePolicy = on_unavailable
        self.retry_interval = float(retry_interval)
        #: Checks and settles that could not reach Redis (checks were decided by the policy).
        self.unavailable = 0
        self._owned = False
        self._down_until: float | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._settle = client.register_script(_SETTLE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 0.5,
        prefix: str = "gatewaykit:rl:",
        on_unavailable: UnavailablePolicy = "fail_open",
        retry_interval: float = 1.0,
    ) -> RedisRateLimiter:
        """A limiter with a client of its own for ``redis://…`` (closed by :meth:`aclose`).

        ``timeout`` bounds connecting and every command, so an unreachable Redis delays a
        request by at most that long before the policy decides.
        """
        try:
            client = Redis.from_url(
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 1),  # once more on a fresh connection, at once
            )
        except ValueError:  # its message may quote the URL, password and all
            raise ConfigurationError(
                "not a Redis URL: expected redis://[:password@]host[:port][/db], rediss:// "
                "or unix://"
            ) from None
        limiter = cls(
            client, prefix=prefix, on_unavailable=on_unavailable, retry_interval=retry_interval
        )
        limiter._owned = True
        return limiter

    def __repr__(self) -> str:
        return f"RedisRateLimiter(prefix={self.prefix!r}, on_unavailable={self.on_unavailable!r})"

    async def open(self) -> None:
        """Nothing to open: the client connects on first use (so a Redis down at start-up
        is an outage like any other, decided by the policy)."""

    async def aclose(self) -> None:
        """Close the client if :meth:`from_url` made it."""
        if self._owned:
            await self.client.aclose()

    async def acquire(
        self, request_id: str, limits: Sequence[RateLimit], tokens: int
    ) -> RateDecision:
        keys: list[str] = []
        args: list[Any] = [request_id, _WINDOW_MS, tokens]
        for limit in limits:
            base = self.prefix + limit.scope
            keys += (base + ":r", base + ":t", base + ":h", base + ":s")
            args += (limit.rpm or 0, limit.tpm or 0)
        reply = await self._run(self._acquire, keys, args)
        if reply is None:
            if self.on_unavailable == "fail_open":
                return RateDecision(allowed=True)
            raise RequestRejected(
                ErrorKind.UNAVAILABLE,
                "rate limits cannot be checked right now (the rate limit store is unreachable)",
            )
        fields = reply.split()
        allowed, refused, reason, wait, rpm, rroom, rreset, tpm, troom, treset = map(int, fields)
        message = ""
        if not allowed:
            limit = limits[refused - 1]
            if reason == 3:
                message = (
                    f"this request's estimated {tokens} tokens exceed the limit of {limit.tpm} "
                    f"tokens per minute for {limit.scope}; lower its max tokens"
                )
            else:
                amount = limit.rpm if reason == 1 else limit.tpm
                message = (
                    f"rate limit of {amount} {_REASONS[reason - 1]} exceeded for {limit.scope}"
                )
        return RateDecision(
            allowed=bool(allowed),
            requests=(
                LimitState(rpm, max(rroom - 1 if allowed else rroom, 0), rreset / 1000)
                if rpm
                else None
            ),
            tokens=(
                LimitState(tpm, max(troom - tokens if allowed else troom, 0), treset / 1000)
                if tpm
                else None
            ),
            retry_after=wait / 1000,
            reason=message,
        )

    async def settle(self, request_id: str, limits: Sequence[RateLimit], tokens: int) -> None:
        keys: list[str] = []
        for limit in limits:
            if limit.tpm is not None:
                base = self.prefix + limit.scope
                keys += (base + ":h", base + ":s")
        if keys:
            await self._run(self._settle, keys, [request_id, tokens])

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """The script's reply, or None when Redis is unreachable (logged and counted)."""
        down_until = self._down_until
        if down_until is not None and time.monotonic() < down_until:
            self.unavailable += 1
            return None
        try:
            reply = await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self.unavailable += 1
            if down_until is None:
                logger.warning(
                    "rate limit store unreachable (%s): %s until it answers",
                    type(exc).__name__,
                    "admitting without limits"
                    if self.on_unavailable == "fail_open"
                    else "refusing requests",
                )
            self._down_until = time.monotonic() + self.retry_interval
            return None
        if down_until is not None:
            self._down_until = None
            logger.warning("rate limit store reachable again: limits apply")
        return reply
