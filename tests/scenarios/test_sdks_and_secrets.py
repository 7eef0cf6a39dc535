"""The official SDKs against a real uvicorn gateway (max_retries=0), and secrets: no client
key, master key or upstream credential in logs (DEBUG), reprs or error bodies."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

import anthropic
import anyio
import openai
import pytest

from gatewaykit.context import SCOPE_KEY
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.usage import Usage
from tests.adapters.conftest import serve
from tests.asgi import call
from tests.scenarios.conftest import MASTER, PRICE, UPSTREAM_KEY, Build, new_key, spent

pytestmark = pytest.mark.anyio

MESSAGES: Any = [{"role": "user", "content": "hello there"}]


async def test_sdks_success_and_gateway_errors(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=20)
    await ledger.set_budget("user:alice", limit=Decimal(1))
    key, record = await new_key(ledger)
    async with serve(build()) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as oai:
            stream = await oai.chat.completions.create(
                model="test-model", messages=MESSAGES, stream=True, max_tokens=50
            )
            chunks = [chunk async for chunk in stream]
            assert all(c.usage is None for c in chunks)  # the injected usage chunk is hidden
            completion = await oai.chat.completions.create(model="test-model", messages=MESSAGES)
            assert completion.usage is not None
            assert completion.usage.prompt_tokens == 20
            with pytest.raises(openai.BadRequestError) as bad:
                await oai.chat.completions.create(
                    model="test-model", messages=MESSAGES, max_tokens=10**30
                )
            assert bad.value.code is None or isinstance(bad.value.code, str)
        async with anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0) as ant:
            async with ant.messages.stream(
                model="test-model", max_tokens=50, messages=MESSAGES
            ) as message_stream:
                final = await message_stream.get_final_message()
            assert final.usage.output_tokens == 3
        one = PRICE.cost(Usage(input_tokens=20, output_tokens=3))
        assert await spent(ledger) == 3 * one
        # Budget exhausted: both SDKs parse the 402 and see why.
        await ledger.set_budget(f"key:{record.key_id}", limit=one)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as oai:
            with pytest.raises(openai.APIStatusError) as denied:
                await oai.chat.completions.create(model="test-model", messages=MESSAGES)
            assert denied.value.status_code == 402
            assert denied.value.code == "budget_exceeded"
            assert denied.value.type == "insufficient_quota"
            assert isinstance(denied.value.body, dict)
            assert denied.value.body["scope"] == f"key:{record.key_id}"
        async with anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0) as ant:
            with pytest.raises(anthropic.APIStatusError) as denied_a:
                await ant.messages.create(model="test-model", max_tokens=50, messages=MESSAGES)
            assert denied_a.value.status_code == 402
            assert isinstance(denied_a.value.body, dict)
            assert denied_a.value.body["error"]["type"] == "billing_error"


async def test_sdks_see_upstream_failures_as_their_own_errors(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    key, _ = await new_key(ledger)
    async with (
        serve(build()) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as oai,
        anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0) as ant,
    ):
        fake.behavior = FakeBehavior(fail_status=429, retry_after="3")
        with pytest.raises(openai.RateLimitError):
            await oai.chat.completions.create(model="test-model", messages=MESSAGES)
        with pytest.raises(anthropic.RateLimitError):
            await ant.messages.create(model="test-model", max_tokens=5, messages=MESSAGES)
        fake.behavior = FakeBehavior(fail_status=401)  # the gateway's credential
        with pytest.raises(openai.InternalServerError) as upstream_auth:
            await oai.chat.completions.create(model="test-model", messages=MESSAGES)
        assert upstream_auth.value.status_code == 502
        with pytest.raises(anthropic.InternalServerError):
            await ant.messages.create(model="test-model", max_tokens=5, messages=MESSAGES)
        fake.behavior = FakeBehavior(events=5, fail_after=2, fail_mode="drop")
        stream = await oai.chat.completions.create(
            model="test-model", messages=MESSAGES, stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
        with pytest.raises(anthropic.APIError):
            async with ant.messages.stream(
                model="test-model", max_tokens=50, messages=MESSAGES
            ) as message_stream:
                await message_stream.get_final_message()
    assert await spent(ledger) > 0  # the two broken streams: charged what was delivered
    assert len(await ledger.usage()) == 6


async def test_no_secret_in_logs_reprs_or_error_bodies(
    build: Build,
    ledger: SQLiteLedger,
    provider: tuple[FakeProvider, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, _ = provider
    key, _ = await new_key(ledger)
    wrong = "gk-" + "Z" * 40
    seen: list[str] = []
    caplog.set_level(logging.DEBUG)
    inner = build()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await inner(scope, receive, send)
        context = scope.get(SCOPE_KEY)  # the middleware writes into the server's scope
        if context is not None:
            settlement = context.settlement
            seen.append(repr(context) + repr(settlement) + repr(context.attempts))
            seen.append(repr(settlement.outcome) + repr(vars(settlement)))

    bodies: list[bytes] = []
    chat = {"model": "test-model", "messages": MESSAGES, "stream": True}
    for behavior in [
        FakeBehavior(),
        FakeBehavior(fail_status=401),
        FakeBehavior(fail_status=500),
        FakeBehavior(events=4, fail_after=1),
        FakeBehavior(malformed="sse"),
    ]:
        fake.behavior = behavior
        for credential in (key, wrong):
            ex = await call(
                app,
                "/v1/chat/completions",
                json_body=chat,
                headers={"authorization": f"Bearer {credential}"},
            )
            bodies.append(ex.body)
    ex = await call(app, "/v1/messages", json_body={"model": "x"}, headers={"x-api-key": MASTER})
    bodies.append(ex.body)
    text = caplog.text + b"".join(bodies).decode(errors="replace") + "".join(seen)
    assert len(seen) == 2 * 5  # two lines for each of the five admitted requests
    text += repr(inner.user_middleware) + repr(ledger) + repr(inner.middleware_stack)
    for secret in (key, wrong, MASTER, UPSTREAM_KEY):
        assert secret not in text
        assert secret[8:] not in text  # nor most of it
    assert caplog.records  # DEBUG logging really was captured


async def test_sdk_client_abandoning_a_stream_on_a_real_server(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    """The official SDK closes its stream after two events: on uvicorn the gateway notices,
    closes the upstream, and charges what went out; no hold stays live."""
    fake, _ = provider
    fake.behavior = FakeBehavior(events=200, input_tokens=20, delay=0.02)
    key, _ = await new_key(ledger)
    async with (
        serve(build()) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as oai,
        anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0) as ant,
    ):
        stream = await oai.chat.completions.create(
            model="test-model", messages=MESSAGES, stream=True
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                break
        await stream.close()
        async with ant.messages.stream(
            model="test-model", max_tokens=500, messages=MESSAGES
        ) as message_stream:
            async for _ in message_stream.text_stream:
                break
        with anyio.fail_after(3):
            while len(await ledger.usage()) < 2 or await ledger.holds():  # noqa: ASYNC110
                await anyio.sleep(0.02)
    records = await ledger.usage()
    assert sorted(r.status for r in records) == ["incomplete", "incomplete"]
    assert all(0 < r.output_tokens < 50 for r in records)  # what went out, not 200 events
    assert await spent(ledger) == sum((r.cost for r in records), Decimal(0))
    with anyio.fail_after(3):
        while fake.disconnects < 2:  # noqa: ASYNC110 - the fake exposes only a counter
            await anyio.sleep(0.02)  # the upstream streams were closed too


async def test_responses_sdk_parses_the_gateways_in_band_error(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=5, fail_after=2, fail_mode="drop")
    key, _ = await new_key(ledger)
    async with (
        serve(build()) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as oai,
    ):
        stream = await oai.responses.create(model="test-model", input="hello", stream=True)
        kinds = [event.type async for event in stream]
    assert kinds[-1] == "error"
    assert "response.output_text.delta" in kinds
    [record] = await ledger.usage()
    assert record.status == "error"
    assert await spent(ledger) == record.cost > 0
