"""Rate limits through the whole gateway: the official SDKs as clients, the fake provider
upstream, a real ledger, both limiters. Token counts are asserted exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from decimal import Decimal
from typing import Any

import anthropic
import anyio
import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import estimate_prompt_tokens
from gatewaykit.ratelimit import InProcessRateLimiter, RateLimit, RateLimiter
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Upstream
from tests.adapters.conftest import PRICE, serve

pytestmark = pytest.mark.anyio

MASTER_KEY = "gk-master-0123456789abcdef0123456789"
PROMPT = "x" * 40
MAX_TOKENS = 50
#: What the gateway counts for one request while it is in flight, and what it used.
ESTIMATE = estimate_prompt_tokens(len(PROMPT)) + MAX_TOKENS
BEHAVIOR = FakeBehavior(events=4, input_tokens=12)  # 16 tokens used per request
USED = 16

Build = Callable[..., Starlette]


@pytest.fixture
async def ledger() -> AsyncIterator[SQLiteLedger]:
    async with SQLiteLedger(":memory:") as store:
        yield store
        assert await store.check() == []
        assert await store.holds() == []  # nothing leaked


class StreamGate:
    """Wraps the fake provider: the last message of every event stream waits for ``open``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.open = anyio.Event()
        self.open.set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        streaming = False

        async def gated(message: Any) -> None:
            nonlocal streaming
            if message["type"] == "http.response.start":
                streaming = any(
                    name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                    for name, value in message.get("headers", [])
                )
            elif streaming and not message.get("more_body", False):
                await self.open.wait()
            await send(message)

        await self.app(scope, receive, gated)


@pytest.fixture
def gate() -> StreamGate:
    return StreamGate(FakeProvider(behavior=BEHAVIOR))


@pytest.fixture
async def upstream_url(gate: StreamGate) -> AsyncIterator[str]:
    async with serve(gate) as url:
        yield url


@pytest.fixture
async def client() -> AsyncIterator[AiohttpClient]:
    async with default_client() as http:
        yield http


@pytest.fixture
def build(
    ledger: SQLiteLedger, client: AiohttpClient, upstream_url: str, limiter: RateLimiter
) -> Build:
    def make(**options: Any) -> Starlette:
        mode = StandaloneMode(
            ledger,
            prices={"test-model": PRICE},
            upstreams=[
                Upstream(f"{upstream_url}/v1", provider="openai"),
                Upstream(upstream_url, provider="anthropic"),
            ],
            master_key=MASTER_KEY,
            rate_limiter=limiter,
            key_cache_ttl=0,
            **options,
        )
        return Starlette(
            routes=gateway_routes(client=client),
            middleware=[Middleware(GatewayMiddleware, mode=mode)],
        )

    return make


async def new_key(ledger: SQLiteLedger, user: str = "alice", **fields: Any) -> str:
    key = generate_key()
    await ledger.create_key(
        ApiKeyRecord(
            key_id=key.key_id, key_hash=key.key_hash, prefix=key.prefix, user=user, **fields
        )
    )
    return key.key


def chat_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "test-model",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": PROMPT}],
        **extra,
    }


async def test_rpm_refusals_reach_both_sdks_as_rate_limit_errors(
    build: Build, ledger: SQLiteLedger
) -> None:
    key = await new_key(ledger, rpm=2)
    async with serve(build()) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as oai:
            raw = await oai.chat.completions.with_raw_response.create(**chat_body())
            assert raw.headers["x-ratelimit-limit-requests"] == "2"
            assert raw.headers["x-ratelimit-remaining-requests"] == "1"
            assert raw.headers["x-ratelimit-reset-requests"] == "1m0s"
            await oai.chat.completions.create(**chat_body())
            with pytest.raises(openai.RateLimitError) as refused:
                await oai.chat.completions.create(**chat_body())
        headers = refused.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 60
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.value.body is not None
        assert "2 requests per minute" in str(refused.value.message)
        async with anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0) as ant:
            with pytest.raises(anthropic.RateLimitError) as refused_a:
                await ant.messages.create(
                    model="test-model",
                    max_tokens=MAX_TOKENS,
                    messages=[{"role": "user", "content": PROMPT}],
                )
        assert refused_a.value.response.headers["retry-after"]
        assert refused_a.value.response.json()["error"]["type"] == "rate_limit_error"


async def test_tpm_counts_estimates_in_flight_and_actual_tokens_exactly(
    build: Build, ledger: SQLiteLedger, gate: StreamGate
) -> None:
    tpm = 3 * ESTIMATE + 10
    key = await new_key(ledger, tpm=tpm)
    headers = {"authorization": f"Bearer {key}"}
    async with serve(build()) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def remaining_after(**extra: Any) -> int:
            response = await http.post(
                "/v1/chat/completions", json=chat_body(**extra), headers=headers
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-ratelimit-limit-tokens"] == str(tpm)
            return int(response.headers["x-ratelimit-remaining-tokens"])

        # Admitted at its estimate; settled (before the response ended) at what it used.
        assert await remaining_after() == tpm - ESTIMATE
        assert await remaining_after() == tpm - USED - ESTIMATE
        # A stream in flight counts at its estimate until it settles.
        gate.open = anyio.Event()
        async with http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True), headers=headers
        ) as open_stream:
            assert open_stream.status_code == 200
            assert int(open_stream.headers["x-ratelimit-remaining-tokens"]) == (
                tpm - 2 * USED - ESTIMATE
            )
            assert await remaining_after() == tpm - 2 * USED - 2 * ESTIMATE
            gate.open.set()
            await open_stream.aread()
        assert await remaining_after() == tpm - 4 * USED - ESTIMATE  # the stream used 16 too
        # A request the budget refuses after the limiter admitted it uses no tokens.
        await ledger.set_budget("user:alice", limit=Decimal(0))
        refused = await http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert refused.status_code == 402
        await ledger.delete_budget("user:alice")
        assert await remaining_after() == tpm - 5 * USED - ESTIMATE
        # Too many tokens in the window: 429 with both kinds of headers.
        big = await http.post(
            "/v1/chat/completions", json=chat_body(max_tokens=tpm), headers=headers
        )
        assert big.status_code == 429
        assert "exceed the limit" in big.json()["error"]["message"]
        assert big.headers["x-ratelimit-remaining-tokens"] == str(tpm - 6 * USED)
        assert int(big.headers["retry-after"]) == 60
    usage = await ledger.usage()
    assert sum(r.input_tokens + r.output_tokens for r in usage) == 6 * USED


async def test_user_and_team_limits_span_keys_and_every_user_gets_its_own(
    build: Build, ledger: SQLiteLedger
) -> None:
    app = build(
        rate_limits=[RateLimit("user:*", rpm=2), RateLimit("team:red", rpm=3)],
        teams={"carol": "red"},
    )
    alice_1, alice_2 = await new_key(ledger, "alice"), await new_key(ledger, "alice")
    bob = await new_key(ledger, "bob", team="red")
    carol = await new_key(ledger, "carol")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:

        async def status(key: str, **extra: Any) -> int:
            response = await http.post(
                "/v1/chat/completions",
                json=chat_body(**extra),
                headers={"authorization": f"Bearer {key}"},
            )
            return response.status_code

        assert [await status(k) for k in (alice_1, alice_2, alice_1)] == [200, 200, 429]
        assert [await status(bob), await status(bob)] == [200, 200]  # bob's own user window
        assert [await status(carol), await status(carol)] == [200, 429]  # team red: 3 in all
        # The master key has no key limits, but its user's apply.
        assert await status(MASTER_KEY, user="dave") == 200
        assert await status(MASTER_KEY, user="dave") == 200
        assert await status(MASTER_KEY, user="dave") == 429


async def test_default_tpm_applies_to_keys_without_their_own(
    build: Build, ledger: SQLiteLedger
) -> None:
    own = await new_key(ledger, tpm=ESTIMATE * 10)
    default = await new_key(ledger)
    transport = httpx.ASGITransport(app=build(default_tpm=ESTIMATE))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        for key, limit in ((own, ESTIMATE * 10), (default, ESTIMATE)):
            response = await http.post(
                "/v1/chat/completions",
                json=chat_body(),
                headers={"authorization": f"Bearer {key}"},
            )
            assert response.headers["x-ratelimit-limit-tokens"] == str(limit)


async def test_a_limit_changed_in_the_ledger_applies_at_once(
    build: Build, ledger: SQLiteLedger
) -> None:
    key = await new_key(ledger, rpm=1)
    transport = httpx.ASGITransport(app=build())
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        assert (
            await http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        ).status_code == 200
        assert (
            await http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        ).status_code == 429
        (record,) = await ledger.list_keys()
        await ledger.update_key(record.key_id, rpm=5)
        response = await http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-requests"] == "3"


async def test_concurrent_streams_are_admitted_within_the_tpm(
    build: Build, ledger: SQLiteLedger, upstream_url: str
) -> None:
    key = await new_key(ledger, tpm=ESTIMATE * 3)
    app = build()
    statuses: list[int] = []
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def one() -> None:
            async with http.stream(
                "POST",
                "/v1/chat/completions",
                json=chat_body(stream=True),
                headers={
                    "authorization": f"Bearer {key}",
                },
            ) as response:
                statuses.append(response.status_code)
                await response.aread()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one)
    # Each admitted stream may settle before the next arrives (freeing ESTIMATE - USED),
    # so at least 3 pass; never more than the window can hold at the estimates' worst.
    admitted = statuses.count(200)
    assert 3 <= admitted <= 3 + (3 * ESTIMATE) // USED
    assert statuses.count(429) == 8 - admitted


class SettleFails(InProcessRateLimiter):
    """A limiter of the user's whose settle always fails."""

    async def settle(self, request_id: str, limits: Sequence[RateLimit], tokens: int) -> None:
        raise RuntimeError("limiter store broke")


async def test_a_limiter_that_fails_to_settle_never_breaks_the_request(
    ledger: SQLiteLedger,
    client: AiohttpClient,
    upstream_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mode = StandaloneMode(
        ledger,
        prices={"test-model": PRICE},
        upstreams=[Upstream(f"{upstream_url}/v1", provider="openai")],
        rate_limiter=SettleFails(),
        default_tpm=10_000,
    )
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    key = await new_key(ledger)
    headers = {"authorization": f"Bearer {key}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        ok = await http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert ok.status_code == 200
        await ledger.set_budget("user:alice", limit=Decimal(0))
        refused = await http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert refused.status_code == 402  # not a 500: the refusal wins over the count
        await ledger.delete_budget("user:alice")
    assert len(await ledger.usage()) == 1  # charged as usual
    assert any(
        "could not settle request" in r.getMessage() and "RuntimeError" in r.getMessage()
        for r in caplog.records
    )


async def test_a_users_own_limit_wins_over_every_users(build: Build, ledger: SQLiteLedger) -> None:
    app = build(rate_limits=[RateLimit("user:*", rpm=3), RateLimit("user:erin", rpm=1)])
    erin = await new_key(ledger, "erin", team="blue")  # team:blue has no limit
    frank = await new_key(ledger, "frank")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:

        async def status(key: str) -> int:
            response = await http.post(
                "/v1/chat/completions",
                json=chat_body(),
                headers={"authorization": f"Bearer {key}"},
            )
            return response.status_code

        assert [await status(erin), await status(erin)] == [200, 429]
        assert [await status(frank) for _ in range(4)] == [200, 200, 200, 429]
