"""``[ratelimit]`` in the serve configuration: where limits are counted, users' and teams'
limits, and the app factory wiring them into StandaloneMode."""

from __future__ import annotations

import sys
import uuid
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from gatewaykit.config import parse_config
from gatewaykit.errors import ConfigurationError
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.ratelimit import InProcessRateLimiter, RateLimit, RedisRateLimiter
from gatewaykit.server import build_app
from tests.scenarios.conftest import new_key

ENV = {"OPENAI_API_KEY": "sk-test"}
UPSTREAM = {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"}


def test_ratelimit_table_builds_a_redis_limiter_and_the_scope_limits() -> None:
    config = parse_config(
        {
            "upstreams": [UPSTREAM],
            "standalone": {"default_rpm": 60, "default_tpm": 50_000},
            "ratelimit": {
                "redis_url": "redis://:hunter2@cache:6379/1",
                "on_unavailable": "fail_closed",
                "limits": [{"scope": "user:*", "rpm": 120}, {"scope": "team:ml", "tpm": 9}],
            },
        },
        environ=ENV,
    )
    masked = config.masked()["ratelimit"]
    assert "hunter2" not in masked["redis_url"]
    assert masked["limits"][0] == {"scope": "user:*", "rpm": 120, "tpm": None}
    [middleware] = build_app(config).user_middleware
    mode = middleware.kwargs["mode"]
    assert isinstance(mode, StandaloneMode)
    assert isinstance(mode.rate_limiter, RedisRateLimiter)
    assert mode.rate_limiter.on_unavailable == "fail_closed"
    assert (mode.default_rpm, mode.default_tpm) == (60, 50_000)
    assert mode.rate_limits == {
        "user:*": RateLimit("user:*", rpm=120),
        "team:ml": RateLimit("team:ml", tpm=9),
    }


def test_without_redis_each_process_counts_its_own() -> None:
    config = parse_config({"upstreams": [UPSTREAM]}, environ=ENV)
    [middleware] = build_app(config).user_middleware
    mode = middleware.kwargs["mode"]
    assert isinstance(mode, StandaloneMode)
    assert isinstance(mode.rate_limiter, InProcessRateLimiter)


def test_a_redis_url_without_redis_py_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "gatewaykit.ratelimit.redis", None)  # import fails
    config = parse_config(
        {"upstreams": [UPSTREAM], "ratelimit": {"redis_url": "redis://cache:6379/0"}}, environ=ENV
    )
    with pytest.raises(ConfigurationError, match=r"pip install 'gatewaykit\[redis\]'"):
        build_app(config)


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"limits": [{"scope": "key:k1", "rpm": 1}]}, "ratelimit.limits[0].scope"),
        ({"limits": [{"scope": "user:a", "rpm": 0}]}, "ratelimit.limits[0].rpm"),
        ({"on_unavailable": "ignore"}, "ratelimit.on_unavailable"),
        ({"redis_url": "http://cache:6379"}, "not a Redis URL"),
    ],
)
def test_bad_ratelimit_tables_are_named(table: dict[str, object], where: str) -> None:
    with pytest.raises(ConfigurationError, match=where.replace("[", r"\[").replace("]", r"\]")):
        build_app(parse_config({"upstreams": [UPSTREAM], "ratelimit": table}, environ=ENV))


@pytest.mark.anyio
@pytest.mark.redis
async def test_the_apps_lifespan_opens_and_closes_the_redis_limiter(tmp_path: Path) -> None:
    from tests.ratelimit.conftest import REDIS_URL

    config = parse_config(
        {
            "upstreams": [UPSTREAM],
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
            "ratelimit": {"redis_url": REDIS_URL},
        },
        environ=ENV,
    )
    app = build_app(config)
    [middleware] = app.user_middleware
    mode = middleware.kwargs["mode"]
    assert isinstance(mode, StandaloneMode)
    limits = [RateLimit(f"key:lifespan-{uuid.uuid4().hex}", rpm=1)]  # fresh on every run
    async with app.router.lifespan_context(app):
        assert (await mode.rate_limiter.acquire("r1", limits, 1)).allowed
        assert not (await mode.rate_limiter.acquire("r2", limits, 1)).allowed


@pytest.mark.anyio
async def test_user_max_concurrent_in_the_file_caps_a_users_requests_in_flight(
    tmp_path: Path,
) -> None:
    config = parse_config(
        {
            "upstreams": [UPSTREAM],
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
            "standalone": {"user_max_concurrent": 1},
        },
        environ=ENV,
    )
    app = build_app(config)
    [middleware] = app.user_middleware
    mode = middleware.kwargs["mode"]
    assert isinstance(mode, StandaloneMode)
    assert mode.user_max_concurrent == 1
    async with app.router.lifespan_context(app):
        key, _ = await new_key(mode.ledger)
        # alice already has one request in flight (a live hold on her scope).
        await mode.ledger.reserve("in-flight", ["user:alice"], Decimal(0), ttl=60)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            refused = await client.post(
                "/v1/chat/completions",
                json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"},
            )
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["scope"] == "user:alice"
        await mode.ledger.release("in-flight")


@pytest.mark.parametrize("value", [0, -1])
def test_user_max_concurrent_must_be_a_positive_int(value: int) -> None:
    message = r"standalone\.user_max_concurrent: Input should be greater than 0"
    with pytest.raises(ConfigurationError, match=message):
        parse_config(
            {"upstreams": [UPSTREAM], "standalone": {"user_max_concurrent": value}}, environ=ENV
        )
