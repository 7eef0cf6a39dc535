"""Redis stops mid-run: the configured policy decides, it is logged once and counted, and
nothing crashes; when Redis answers again the limits apply again."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gatewaykit import GatewayMiddleware, get_settlement
from gatewaykit.errors import ErrorKind, RequestRejected
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.ratelimit import RateLimit, RedisRateLimiter
from gatewaykit.upstream import Upstream
from gatewaykit.usage import Usage
from tests.adapters.conftest import PRICE
from tests.ratelimit.conftest import MakeRedisLimiter, RedisServer

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

LIMITS = [RateLimit("key:k", rpm=1, tpm=100)]


async def test_fail_open_admits_while_redis_is_down_and_limits_again_after(
    redis_server: RedisServer,
    redis_limiter: MakeRedisLimiter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = redis_limiter(redis_server.url, retry_interval=0)
    assert (await limiter.acquire("r1", LIMITS, 10)).allowed
    assert not (await limiter.acquire("r2", LIMITS, 10)).allowed
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="gatewaykit.ratelimit"):
        for n in range(3):
            decision = await limiter.acquire(f"down{n}", LIMITS, 10)
            assert decision.allowed
            assert decision.headers == {}  # nothing known, nothing claimed
        await limiter.settle("r1", LIMITS, 5)  # a settle during the outage is dropped
    assert limiter.unavailable == 4
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "rate limit store unreachable (ConnectionError): admitting without limits until it answers"
    ]
    caplog.clear()
    redis_server.start()  # empty: the counts died with it
    with caplog.at_level(logging.WARNING, logger="gatewaykit.ratelimit"):
        assert (await limiter.acquire("r3", LIMITS, 10)).allowed
        assert not (await limiter.acquire("r4", LIMITS, 10)).allowed
    assert [r.getMessage() for r in caplog.records] == [
        "rate limit store reachable again: limits apply"
    ]
    assert limiter.unavailable == 4


async def test_fail_closed_refuses_with_503_while_redis_is_down(
    redis_server: RedisServer, redis_limiter: MakeRedisLimiter
) -> None:
    limiter = redis_limiter(redis_server.url, on_unavailable="fail_closed", retry_interval=0)
    assert (await limiter.acquire("r1", LIMITS, 10)).allowed
    redis_server.stop()
    with pytest.raises(RequestRejected) as refused:
        await limiter.acquire("r2", LIMITS, 10)
    assert refused.value.kind is ErrorKind.UNAVAILABLE
    assert refused.value.status == 503
    assert limiter.unavailable == 1


async def test_after_a_failure_redis_is_not_asked_again_for_the_retry_interval(
    redis_server: RedisServer, redis_limiter: MakeRedisLimiter
) -> None:
    limiter = redis_limiter(redis_server.url, retry_interval=3600)
    redis_server.stop()
    assert (await limiter.acquire("r1", LIMITS, 10)).allowed
    redis_server.start()
    for n in range(3):  # decided by the policy without a connection attempt
        assert (await limiter.acquire(f"r{n + 2}", LIMITS, 10)).allowed
    assert limiter.unavailable == 4


def test_bad_settings_are_configuration_errors() -> None:
    from gatewaykit.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="fail_open or fail_closed"):
        RedisRateLimiter.from_url("redis://127.0.0.1:1/0", on_unavailable="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="retry_interval"):
        RedisRateLimiter.from_url("redis://127.0.0.1:1/0", retry_interval=-1)
    with pytest.raises(ConfigurationError, match="not a Redis URL") as bad:
        RedisRateLimiter.from_url("http://user:s3cret@cache:6379/0")
    assert "s3cret" not in str(bad.value)
    limiter = RedisRateLimiter.from_url("redis://:s3cret@127.0.0.1:1/0")
    assert repr(limiter) == "RedisRateLimiter(prefix='gatewaykit:rl:', on_unavailable='fail_open')"


# -- through the gateway ------------------------------------------------------------------------


@pytest.fixture
async def ledger() -> AsyncIterator[SQLiteLedger]:
    async with SQLiteLedger(":memory:") as store:
        yield store
        assert await store.check() == []
        assert await store.holds() == []


def gateway(ledger: SQLiteLedger, limiter: RedisRateLimiter) -> Starlette:
    async def endpoint(request: Request) -> Response:
        await get_settlement(request).on_success(Usage(3, 4))
        return JSONResponse({"choices": []})

    mode = StandaloneMode(
        ledger,
        prices={"test-model": PRICE},
        upstreams=[Upstream("https://o.example/v1", provider="openai")],
        rate_limiter=limiter,
    )
    return Starlette(
        routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])],
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )


@pytest.mark.parametrize(("policy", "while_down"), [("fail_open", 200), ("fail_closed", 503)])
async def test_redis_stopped_mid_run_under_the_gateway(
    redis_server: RedisServer,
    redis_limiter: MakeRedisLimiter,
    ledger: SQLiteLedger,
    policy: Any,
    while_down: int,
) -> None:
    new = generate_key()
    await ledger.create_key(
        ApiKeyRecord(
            key_id=new.key_id, key_hash=new.key_hash, prefix=new.prefix, user="u", rpm=2, tpm=500
        )
    )
    limiter = redis_limiter(redis_server.url, on_unavailable=policy, retry_interval=0)
    app = gateway(ledger, limiter)
    body = {
        "model": "test-model",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
    }
    headers = {"authorization": f"Bearer {new.key}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        first = await http.post("/v1/chat/completions", json=body, headers=headers)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        redis_server.stop()
        statuses = [
            (await http.post("/v1/chat/completions", json=body, headers=headers)).status_code
            for _ in range(4)
        ]
        assert statuses == [while_down] * 4
        if while_down == 503:
            refused = await http.post("/v1/chat/completions", json=body, headers=headers)
            assert refused.json()["error"]["type"] == "api_error"
            assert "rate limit store is unreachable" in refused.json()["error"]["message"]
        redis_server.start()
        back = [
            (await http.post("/v1/chat/completions", json=body, headers=headers)).status_code
            for _ in range(3)
        ]
        assert back == [200, 200, 429]
    usage = await ledger.usage()
    assert len(usage) == 3 + (4 if while_down == 200 else 0)  # each admitted one charged
    assert limiter.unavailable >= 4
