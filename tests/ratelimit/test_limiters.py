"""Both limiters, one contract: sliding-minute RPM and TPM, all limits or none, the headers."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.ratelimit import (
    InProcessRateLimiter,
    LimitState,
    RateDecision,
    RateLimit,
    RateLimiter,
    format_duration,
)
from tests.ratelimit.conftest import MakeRedisLimiter

pytestmark = pytest.mark.anyio

_ids = (f"req_{n}" for n in itertools.count())


def rid() -> str:
    return next(_ids)


async def test_rpm_admits_the_limit_then_refuses_with_retry_after(limiter: RateLimiter) -> None:
    key = [RateLimit("key:k1", rpm=3)]
    remaining = []
    for _ in range(3):
        decision = await limiter.acquire(rid(), key, 10)
        assert decision.allowed
        assert decision.requests is not None
        remaining.append(decision.requests.remaining)
    assert remaining == [2, 1, 0]
    refused = await limiter.acquire(rid(), key, 10)
    assert not refused.allowed
    assert refused.requests == LimitState(3, 0, refused.requests.reset if refused.requests else 0)
    assert 0 < refused.retry_after <= 60
    assert refused.reason == "rate limit of 3 requests per minute exceeded for key:k1"
    assert refused.tokens is None  # no tpm on this limit
    headers = refused.headers
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(headers["retry-after"]) <= 60
    assert "x-ratelimit-limit-tokens" not in headers
    # another scope has a window of its own
    assert (await limiter.acquire(rid(), [RateLimit("key:k2", rpm=3)], 10)).allowed


async def test_a_request_is_admitted_on_all_its_limits_or_counted_on_none(
    limiter: RateLimiter,
) -> None:
    key, user = RateLimit("key:k1", rpm=5), RateLimit("user:u", rpm=1)
    assert (await limiter.acquire(rid(), [key, user], 10)).allowed
    refused = await limiter.acquire(rid(), [key, user], 10)
    assert not refused.allowed
    assert "user:u" in refused.reason
    # the refused request was not counted on the key: 5 - 1 (admitted) - 1 (this one)
    alone = await limiter.acquire(rid(), [key], 10)
    assert alone.requests is not None
    assert alone.requests.remaining == 3


async def test_tpm_counts_estimates_in_flight_and_actual_tokens_once_settled(
    limiter: RateLimiter,
) -> None:
    limits = [RateLimit("key:k1", tpm=100)]
    first, second, third = rid(), rid(), rid()
    a = await limiter.acquire(first, limits, 40)
    assert a.allowed
    assert a.tokens == LimitState(100, 60, a.tokens.reset if a.tokens else 0)
    b = await limiter.acquire(second, limits, 40)
    assert b.tokens is not None
    assert (b.allowed, b.tokens.remaining) == (True, 20)
    refused = await limiter.acquire(third, limits, 40)
    assert not refused.allowed
    assert refused.reason == "rate limit of 100 tokens per minute exceeded for key:k1"
    assert refused.tokens is not None
    assert refused.tokens.remaining == 20
    await limiter.settle(third, limits, 5)  # never counted: nothing to replace
    await limiter.settle(first, limits, 10)  # 40 estimated, 10 used
    c = await limiter.acquire(third, limits, 40)  # 10 + 40 + 40 = 90
    assert c.tokens is not None
    assert (c.allowed, c.tokens.remaining) == (True, 10)
    await limiter.settle(second, limits, 0)  # refused after admission: no tokens used
    d = await limiter.acquire(rid(), limits, 50)  # 10 + 0 + 40 + 50 = 100
    assert d.tokens is not None
    assert (d.allowed, d.tokens.remaining) == (True, 0)
    assert not (await limiter.acquire(rid(), limits, 1)).allowed


async def test_a_request_larger_than_the_tpm_is_refused_with_the_reason(
    limiter: RateLimiter,
) -> None:
    decision = await limiter.acquire(rid(), [RateLimit("key:k1", rpm=10, tpm=100)], 101)
    assert not decision.allowed
    assert "estimated 101 tokens exceed the limit of 100 tokens per minute" in decision.reason
    assert decision.retry_after == 60
    assert decision.requests is not None
    assert decision.requests.remaining == 10  # nothing counted


async def test_headers_describe_the_tightest_limit_of_each_kind(limiter: RateLimiter) -> None:
    limits = [
        RateLimit("key:k1", rpm=100, tpm=1000),
        RateLimit("user:u", rpm=10),
        RateLimit("team:t", tpm=500),
    ]
    decision = await limiter.acquire(rid(), limits, 50)
    assert decision.allowed
    headers = decision.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == (
        "10",
        "9",
    )
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == (
        "500",
        "450",
    )
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "retry-after" not in headers


async def test_no_limits_admit_and_say_nothing(limiter: RateLimiter) -> None:
    decision = await limiter.acquire(rid(), [], 10)
    assert decision.allowed
    assert decision.headers == {}


async def test_concurrent_checks_admit_exactly_the_limit(limiter: RateLimiter) -> None:
    limits = [RateLimit("key:k1", rpm=10, tpm=10_000)]
    results: list[bool] = []

    async def one() -> None:
        results.append((await limiter.acquire(rid(), limits, 100)).allowed)

    async with anyio.create_task_group() as tg:
        for _ in range(25):
            tg.start_soon(one)
    assert (results.count(True), results.count(False)) == (10, 15)


# -- the in-process window, with a clock the test moves ------------------------------------------


async def test_inprocess_window_slides() -> None:
    now = [1000.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    limits = [RateLimit("key:k", rpm=2, tpm=100)]
    first = await limiter.acquire("r1", limits, 30)
    assert first.requests == LimitState(2, 1, 60.0)
    now[0] += 30
    second = await limiter.acquire("r2", limits, 30)
    assert second.requests == LimitState(2, 0, 30.0)  # the oldest leaves in 30 s
    assert second.tokens == LimitState(100, 40, 30.0)
    refused = await limiter.acquire("r3", limits, 30)
    assert (refused.allowed, refused.retry_after) == (False, 30.0)
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["retry-after-ms"] == "30000"
    now[0] += 30  # r1 leaves the window, with its requests and tokens
    third = await limiter.acquire("r3", limits, 70)
    assert third.allowed
    assert third.tokens == LimitState(100, 0, 30.0)
    await limiter.settle("r1", limits, 5)  # left the window: changes nothing
    assert not (await limiter.acquire("r4", limits, 1)).allowed


async def test_inprocess_token_retry_after_waits_for_enough_tokens_to_leave() -> None:
    now = [0.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    limits = [RateLimit("key:k", tpm=100)]
    for tokens in (20, 30, 40):
        await limiter.acquire(rid(), limits, tokens)
        now[0] += 10
    refused = await limiter.acquire(rid(), limits, 55)  # 90 used: 45 must leave
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(40.0)  # when the 2nd entry (t=10) leaves at 70


async def test_inprocess_forgets_idle_scopes() -> None:
    now = [0.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    for n in range(999):
        await limiter.acquire(rid(), [RateLimit(f"key:k{n}", rpm=1, tpm=10)], 1)
    now[0] += 61
    await limiter.acquire(rid(), [RateLimit("key:last", rpm=1)], 1)  # the 1000th prunes
    assert len(limiter._windows) <= 2


# -- Redis specifics -----------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_window_slides_when_entries_age(redis_limiter: MakeRedisLimiter) -> None:
    limiter = redis_limiter()
    redis: Any = limiter.client
    limits = [RateLimit("key:k", rpm=1, tpm=100)]
    assert (await limiter.acquire("r1", limits, 60)).allowed
    refused = await limiter.acquire("r2", limits, 60)
    assert not refused.allowed
    assert 59 < refused.retry_after <= 60
    # Age every entry by a minute, as if the server clock had moved on.
    for suffix in (":r", ":t"):
        key = limiter.prefix + "key:k" + suffix
        for member, score in await redis.zrange(key, 0, -1, withscores=True):
            await redis.zadd(key, {member: score - 60_001})
    admitted = await limiter.acquire("r2", limits, 100)
    assert admitted.allowed
    assert admitted.tokens == LimitState(100, 0, admitted.tokens.reset if admitted.tokens else 0)
    # the expired entry's tokens were taken out of the running sum and its hash
    assert await redis.hkeys(limiter.prefix + "key:k:h") == [b"r2"]
    assert int(await redis.get(limiter.prefix + "key:k:s")) == 100
    assert 59_000 < await redis.pttl(limiter.prefix + "key:k:r") <= 60_000


@pytest.mark.redis
async def test_redis_limiters_in_two_clients_share_one_limit(
    redis_limiter: MakeRedisLimiter,
) -> None:
    one, two = redis_limiter(), redis_limiter()
    limits = [RateLimit("key:k", rpm=10)]
    results: list[bool] = []

    async def hit(limiter: RateLimiter) -> None:
        results.append((await limiter.acquire(rid(), limits, 1)).allowed)

    async with anyio.create_task_group() as tg:
        for n in range(25):
            tg.start_soon(hit, (one, two)[n % 2])
    assert (results.count(True), results.count(False)) == (10, 15)


# -- pieces ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0201, "1s"),
        (1, "1s"),
        (1.5, "2s"),
        (59.9911, "1m0s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (61.25, "1m2s"),
        (3600, "1h0m0s"),
        (3725, "1h2m5s"),
        (-3, "0s"),
    ],
)
def test_format_duration_writes_openai_style_durations(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_package_names_what_it_has() -> None:
    import gatewaykit.ratelimit

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gatewaykit.ratelimit.Nope  # noqa: B018


def test_refusal_headers_round_retry_after_up() -> None:
    decision = RateDecision(allowed=False, retry_after=0.2)
    assert decision.headers == {"retry-after": "1", "retry-after-ms": "200"}


@pytest.mark.parametrize(
    "fields",
    [{"scope": "alice"}, {"scope": "key:k", "rpm": 0}, {"scope": "key:k", "tpm": True}],
)
def test_bad_limits_are_configuration_errors(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RateLimit(**fields)  # type: ignore[arg-type]


async def test_settling_a_limit_without_tokens_or_an_unknown_scope_does_nothing(
    limiter: RateLimiter,
) -> None:
    requests_only = [RateLimit("key:k1", rpm=5)]
    assert (await limiter.acquire("r1", requests_only, 10)).allowed
    await limiter.settle("r1", requests_only, 3)
    await limiter.settle("r1", [RateLimit("key:never-seen", tpm=10)], 3)
    decision = await limiter.acquire("r2", requests_only, 10)
    assert decision.requests is not None
    assert decision.requests.remaining == 3


async def test_the_longest_wait_of_the_refusing_limits_is_the_retry_after() -> None:
    now = [0.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    key, user = RateLimit("key:k", rpm=1, tpm=100), RateLimit("user:u", rpm=1, tpm=100)
    assert (await limiter.acquire("r1", [user], 90)).allowed  # the user's window fills first
    now[0] += 20
    assert (await limiter.acquire("r2", [key], 90)).allowed
    refused = await limiter.acquire("r3", [key, user], 50)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(60.0)  # the key's entry leaves last, at 80
    assert "key:k" in refused.reason
    refused = await limiter.acquire("r3", [user, key], 50)
    assert refused.retry_after == pytest.approx(60.0)  # whatever the order of the limits
    assert "key:k" in refused.reason


async def test_pruning_keeps_the_scopes_still_counted() -> None:
    now = [0.0]
    limiter = InProcessRateLimiter(clock=lambda: now[0])
    await limiter.acquire("old", [RateLimit("key:old", rpm=1)], 1)
    now[0] += 30
    await limiter.acquire("busy", [RateLimit("key:busy", rpm=1)], 1)
    now[0] += 31  # key:old left its window, key:busy has not
    for n in range(998):
        await limiter.acquire(f"r{n}", [], 1)  # the 1000th check prunes
    assert set(limiter._windows) == {"key:busy"}


@pytest.mark.redis
async def test_a_redis_limiter_leaves_a_client_it_was_given_open(
    redis_limiter: MakeRedisLimiter,
) -> None:
    from gatewaykit.ratelimit import RedisRateLimiter

    client = redis_limiter().client
    async with RedisRateLimiter(client, prefix="gk_test:given:") as given:
        assert (await given.acquire("r1", [RateLimit("key:k", rpm=1)], 1)).allowed
    assert await client.ping()  # still usable: the limiter did not close it
    await client.delete("gk_test:given:key:k:r")
