"""Holds that fit the remaining budget, end to end: the official SDKs against the gateway
on a real uvicorn server, the fake provider behind it, on SQLite and on PostgreSQL.

A request whose worst case (the prompt plus 4,096 output tokens) does not fit the budget
is admitted with the largest output cap that does, sent upstream with that cap, and told
so in ``x-gatewaykit-max-output-tokens``; 402 only when not even ``min_output_tokens`` fit.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anthropic
import anyio
import openai
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.ledger.base import Ledger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.usage import Usage
from tests.adapters.conftest import serve
from tests.scenarios.conftest import PRICE, new_key, upstreams

pytestmark = pytest.mark.anyio

MICRO = Decimal("0.000001")  # one prompt token (and half an output token) at PRICE
HELLO: Any = [{"role": "user", "content": "Say hello"}]  # 9 characters: 3 prompt tokens held


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    if request.param == "sqlite":
        from gatewaykit.ledger.sqlite import SQLiteLedger

        async with SQLiteLedger(":memory:") as store:
            yield store
            assert await store.check() == []
            assert await store.holds() == []
        return
    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    async with fresh_schema("gk_fit") as schema, PostgresLedger(DSN, schema=schema) as pg:
        yield pg
        assert await pg.check() == []
        assert await pg.holds() == []


@contextlib.asynccontextmanager
async def gateway(
    ledger: Ledger, client: AiohttpClient, upstream_url: str, **options: Any
) -> AsyncIterator[str]:
    mode = StandaloneMode(
        ledger, prices={"test-model": PRICE}, upstreams=upstreams(upstream_url), **options
    )
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    async with serve(app) as url:
        yield url


async def remaining(ledger: Ledger) -> Decimal:
    status = await ledger.status("user:alice")
    assert status is not None
    assert status.remaining is not None
    return status.remaining


def fitted_cap(room: Decimal, prompt_tokens: int = 3) -> int:
    """The largest output cap whose hold (prompt at 1 µ$, output at 2 µ$ a token) fits."""
    return int((room - prompt_tokens * MICRO) / (2 * MICRO))


async def test_fitted_hold_rewrites_the_cap_in_every_format(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    key, _ = await new_key(ledger)
    await ledger.set_budget("user:alice", limit=Decimal("0.001"))  # the worst case is $0.0082
    async with (
        gateway(ledger, client, url, over_budget="fit") as base,
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as oai,
        anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0) as ant,
    ):
        # Chat completions, no cap of its own: the default 4,096 is fitted and sent as
        # max_completion_tokens.
        cap = fitted_cap(await remaining(ledger))
        raw = await oai.chat.completions.with_raw_response.create(
            model="test-model", messages=HELLO
        )
        assert raw.http_response.status_code == 200
        assert raw.headers["x-gatewaykit-max-output-tokens"] == str(cap)
        assert raw.parse().choices[0].message.content
        assert fake.requests[-1].body["max_completion_tokens"] == cap
        assert "max_tokens" not in fake.requests[-1].body

        # Anthropic messages, streamed, with its own (too large) cap.
        cap = fitted_cap(await remaining(ledger))
        async with ant.messages.with_streaming_response.create(
            model="test-model", max_tokens=4096, messages=HELLO, stream=True
        ) as streamed:
            assert streamed.headers["x-gatewaykit-max-output-tokens"] == str(cap)
            events: Any = await streamed.parse()
            events = [event.type async for event in events]
        assert events[-1] == "message_stop"
        assert fake.requests[-1].body["max_tokens"] == cap

        # Responses: max_output_tokens.
        cap = fitted_cap(await remaining(ledger))
        response = await oai.responses.with_raw_response.create(
            model="test-model", input="Say hello", max_output_tokens=4096
        )
        assert response.headers["x-gatewaykit-max-output-tokens"] == str(cap)
        assert fake.requests[-1].body["max_output_tokens"] == cap

        # A request that fits whole is forwarded untouched, without the header.
        raw = await oai.chat.completions.with_raw_response.create(
            model="test-model", messages=HELLO, max_tokens=10
        )
        assert "x-gatewaykit-max-output-tokens" not in raw.headers
        assert fake.requests[-1].body["max_tokens"] == 10

    # Room for a whole default hold: a request without a cap of its own still goes
    # upstream with the cap it was held for, or the provider's own default could spend
    # past the hold and the budget.
    await ledger.set_budget("user:alice", limit=Decimal("1"))
    async with (
        gateway(ledger, client, url, over_budget="fit") as base,
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as oai,
    ):
        raw = await oai.chat.completions.with_raw_response.create(
            model="test-model", messages=HELLO
        )
        assert raw.headers["x-gatewaykit-max-output-tokens"] == "4096"
        assert fake.requests[-1].body["max_completion_tokens"] == 4096

    charge = PRICE.cost(Usage(input_tokens=20, output_tokens=4))
    status = await ledger.status("user:alice")
    assert status is not None
    assert status.spent == 5 * charge  # exact, to the nano-dollar
    assert status.held == 0


async def test_refused_only_below_min_output_tokens(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    _, url = provider
    key, _ = await new_key(ledger)
    smallest = 3 * MICRO + 256 * 2 * MICRO  # the prompt and 256 output tokens
    await ledger.set_budget("user:alice", limit=smallest - Decimal("0.000000001"))
    async with (
        gateway(ledger, client, url, over_budget="fit") as base,
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as oai,
    ):
        with pytest.raises(openai.APIStatusError) as refused:
            await oai.chat.completions.create(model="test-model", messages=HELLO)
        assert refused.value.status_code == 402
        error: Any = refused.value.body
        assert error["code"] == "budget_exceeded"
        assert Decimal(error["requested"]) == smallest
        assert Decimal(error["remaining"]) == await remaining(ledger)

        await ledger.set_budget("user:alice", limit=smallest)
        raw = await oai.chat.completions.with_raw_response.create(
            model="test-model", messages=HELLO
        )
        assert raw.headers["x-gatewaykit-max-output-tokens"] == "256"


async def test_extended_thinking_is_fitted_no_lower_than_its_least_budget(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    """Room for 1,100 output tokens: fitted to 1,100 with a 1,099 thinking budget. Room
    for 600: a thinking request is refused (a 1,024 budget cannot fit) rather than sent
    with a budget Anthropic would refuse; the same request without thinking is fitted."""
    fake, url = provider
    key, _ = await new_key(ledger)
    thinking: Any = {"type": "enabled", "budget_tokens": 2000}
    async with (
        gateway(ledger, client, url, over_budget="fit") as base,
        anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0) as ant,
    ):
        await ledger.set_budget("user:alice", limit=(3 + 2 * 1100) * MICRO)
        raw = await ant.messages.with_raw_response.create(
            model="test-model", max_tokens=4096, messages=HELLO, thinking=thinking
        )
        assert raw.headers["x-gatewaykit-max-output-tokens"] == "1100"
        assert fake.requests[-1].body["max_tokens"] == 1100
        assert fake.requests[-1].body["thinking"]["budget_tokens"] == 1099

        status = await ledger.status("user:alice")
        assert status is not None
        await ledger.set_budget("user:alice", limit=status.spent + (3 + 2 * 600) * MICRO)
        sent = len(fake.requests)
        with pytest.raises(anthropic.APIStatusError) as refused:
            await ant.messages.create(
                model="test-model", max_tokens=4096, messages=HELLO, thinking=thinking
            )
        assert refused.value.status_code == 402
        assert len(fake.requests) == sent  # nothing went upstream
        raw = await ant.messages.with_raw_response.create(
            model="test-model", max_tokens=4096, messages=HELLO
        )
        assert raw.headers["x-gatewaykit-max-output-tokens"] == "600"
    assert await ledger.check() == []


async def test_twenty_concurrent_fitted_streams_never_overspend(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    """Each stream writes up to its cap (the provider stops there), so every charge is at
    most its hold, and the holds never share room: the budget cannot go below zero."""
    fake, url = provider
    fake.behavior = FakeBehavior(events=1000, input_tokens=3, respect_output_cap=True)
    key, _ = await new_key(ledger)
    # Each asks for 1,000 output tokens: a hold of $0.002003. $0.01 holds four whole, then
    # fits 992 tokens into the $0.001988 left; the other fifteen find $0.000001: 402.
    limit = Decimal("0.01")
    await ledger.set_budget("user:alice", limit=limit)
    outcomes: list[tuple[int, int | None, int]] = []  # status, header cap, chunks streamed
    async with (
        gateway(ledger, client, url, over_budget="fit") as base,
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as oai,
    ):

        async def one() -> None:
            try:
                async with oai.chat.completions.with_streaming_response.create(
                    model="test-model", messages=HELLO, max_tokens=1000, stream=True
                ) as streamed:
                    header = streamed.headers.get("x-gatewaykit-max-output-tokens")
                    chunks: Any = await streamed.parse()
                    chunks = [c async for c in chunks if c.choices]
                    outcomes.append((200, int(header) if header else None, len(chunks)))
            except openai.APIStatusError as exc:
                outcomes.append((exc.status_code, None, 0))

        async with anyio.create_task_group() as group:
            for _ in range(20):
                group.start_soon(one)

    assert sorted(status for status, _, _ in outcomes) == [200] * 5 + [402] * 15
    assert sorted(cap for _, cap, _ in outcomes if cap is not None) == [992]
    assert sorted(r.body["max_tokens"] for r in fake.requests) == [992] + [1000] * 4
    events = sorted(n for status, _, n in outcomes if status == 200)
    assert events == [994] + [1002] * 4  # the cap's tokens, the role and finish chunks
    status = await ledger.status("user:alice")
    assert status is not None
    assert status.held == 0
    assert status.spent <= limit
    usage = await ledger.usage(limit=100)
    assert status.spent == sum(r.cost for r in usage)
    assert sorted(r.output_tokens for r in usage) == [992] + [1000] * 4
    assert await ledger.check() == []


@pytest.mark.parametrize("over_budget", ["refuse", "fit"])
async def test_a_refunded_error_reports_the_remaining_without_its_hold(
    ledger: Ledger, client: AiohttpClient, over_budget: str
) -> None:
    """Issue 15 §5: the hold of a 502 is refunded, and the header says so."""
    key, _ = await new_key(ledger)
    await ledger.set_budget("user:alice", limit=Decimal("0.01"))
    dead = "http://127.0.0.1:9"  # nothing listens: the upstream is unreachable
    async with (
        gateway(ledger, client, dead, over_budget=over_budget) as base,
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as oai,
    ):
        with pytest.raises(openai.APIStatusError) as failed:
            await oai.chat.completions.create(model="test-model", messages=HELLO)
    assert failed.value.status_code == 502
    headers = failed.value.response.headers
    assert Decimal(headers["x-gatewaykit-budget-remaining"]) == await remaining(ledger)
    assert await remaining(ledger) == Decimal("0.01")


async def test_a_402_after_an_overrun_shows_the_negative_remaining(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    """Issue 15 §5: the 402 body's remaining is what ``budgets show`` says, even below 0."""
    _, url = provider
    key, _ = await new_key(ledger)
    await ledger.set_budget("user:alice", limit=Decimal("0.00001"))
    await ledger.reserve("earlier", ["user:alice"], Decimal("0.00001"), ttl=60)
    await ledger.settle("earlier", Decimal("0.0000812"))  # the provider billed more
    async with (
        gateway(ledger, client, url) as base,
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as oai,
    ):
        with pytest.raises(openai.APIStatusError) as refused:
            await oai.chat.completions.create(model="test-model", messages=HELLO, max_tokens=5)
    assert refused.value.status_code == 402
    body: Any = refused.value.body
    assert Decimal(body["remaining"]) == await remaining(ledger) == Decimal("-0.0000712")
    assert "$-0.0000712 of $0.00001 remaining" in body["message"]
