"""End to end: GatewayMiddleware + StandaloneMode + SQLiteLedger + the adapters, in front of
the fake provider on a real socket. Spend is asserted to the nano-USD."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import anthropic
import anyio
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Upstream
from gatewaykit.usage import Usage
from tests.adapters.conftest import BEHAVIOR, CHAT, MESSAGES, PRICE, Format, serve
from tests.asgi import Exchange, call

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[AiohttpClient]:
    async with default_client() as http:
        yield http


@pytest.fixture
async def ledger() -> AsyncIterator[SQLiteLedger]:
    async with SQLiteLedger(":memory:") as store:
        yield store
        assert await store.check() == []
        assert await store.holds() == []  # nothing leaked, whatever happened


async def new_key(ledger: SQLiteLedger, **fields: Any) -> tuple[str, ApiKeyRecord]:
    key = generate_key()
    record = ApiKeyRecord(
        key_id=key.key_id, key_hash=key.key_hash, prefix=key.prefix, user="alice", **fields
    )
    await ledger.create_key(record)
    return key.key, record


@pytest.fixture
async def key(ledger: SQLiteLedger) -> str:
    await ledger.set_budget("user:alice", limit=Decimal(1))
    return (await new_key(ledger))[0]


Build = Callable[..., Starlette]


@pytest.fixture
def build(ledger: SQLiteLedger, client: AiohttpClient, provider: tuple[FakeProvider, str]) -> Build:
    _, url = provider

    def make(**options: Any) -> Starlette:
        mode = StandaloneMode(
            ledger,
            prices={"test-model": PRICE},
            upstreams=[
                Upstream(f"{url}/v1", api_key="sk-upstream", provider="openai"),
                Upstream(url, api_key="sk-upstream", provider="anthropic"),
            ],
            **options,
        )
        return Starlette(
            routes=gateway_routes(client=client),
            middleware=[Middleware(GatewayMiddleware, mode=mode)],
        )

    return make


def auth(fmt: Format, key: str) -> dict[str, str]:
    if fmt is MESSAGES:
        return {"x-api-key": key}
    return {"authorization": f"Bearer {key}"}


async def spent(ledger: SQLiteLedger) -> Decimal:
    status = await ledger.status("user:alice")
    assert status is not None
    return status.spent


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_success_charges_exactly_the_reported_usage(
    fmt: Format, stream: bool, build: Build, ledger: SQLiteLedger, key: str
) -> None:
    ex = await call(build(), fmt.path, json_body=fmt.body(stream=stream), headers=auth(fmt, key))
    assert ex.status == 200
    assert ex.headers["x-request-id"]  # the middleware's headers reach the adapter's response
    assert BEHAVIOR.piece(0).encode() in ex.body
    expected = fmt.expected()
    assert await spent(ledger) == PRICE.cost(expected)
    [record] = await ledger.usage()
    assert record.status == "success"
    assert record.usage_source == "provider"
    assert (record.input_tokens, record.output_tokens) == (
        expected.input_tokens,
        expected.output_tokens,
    )
    assert (record.cache_read_tokens, record.cache_write_tokens) == (
        expected.cache_read_tokens,
        expected.cache_write_tokens,
    )


@pytest.mark.parametrize("policy", ["estimate", "hold", "allow_free", "fail"])
async def test_missing_usage_under_each_policy(
    fmt: Format,
    policy: str,
    build: Build,
    ledger: SQLiteLedger,
    key: str,
    provider: tuple[FakeProvider, str],
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(**{**_fields(BEHAVIOR), "omit_usage": True})
    app = build(missing_usage=policy)
    ex = await call(app, fmt.path, json_body=fmt.body(stream=True), headers=auth(fmt, key))
    assert ex.status == 200
    [record] = await ledger.usage()
    assert record.status == "no_usage"
    if policy == "allow_free":
        assert await spent(ledger) == 0
        return
    if policy == "hold":
        # The whole hold: the prompt estimate plus the request's output cap (or default).
        assert record.usage_source == "estimated"
        assert await spent(ledger) == record.cost > 0
        return
    # estimate / fail: the prompt estimate plus the output observed, ceil(chars / 4).
    assert record.usage_source == "estimated"
    assert record.output_tokens == math.ceil(len(BEHAVIOR.output_text) / 4)
    charge = Usage(input_tokens=record.input_tokens, output_tokens=record.output_tokens)
    assert await spent(ledger) == PRICE.cost(charge)
    assert (record.error is not None) == (policy == "fail")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_failure_before_first_chunk_refunds(
    fmt: Format,
    stream: bool,
    build: Build,
    ledger: SQLiteLedger,
    key: str,
    provider: tuple[FakeProvider, str],
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(fail_status=503)
    ex = await call(build(), fmt.path, json_body=fmt.body(stream=stream), headers=auth(fmt, key))
    assert ex.status == 503
    assert await spent(ledger) == 0
    [record] = await ledger.usage()
    assert record.status == "error"


async def test_failure_mid_stream_charges_what_was_consumed(
    fmt: Format, build: Build, ledger: SQLiteLedger, key: str, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(**{**_fields(BEHAVIOR), "fail_after": 2})
    ex = await call(build(), fmt.path, json_body=fmt.body(stream=True), headers=auth(fmt, key))
    assert ex.status == 200
    assert b"error" in ex.chunks[-1]
    [record] = await ledger.usage()
    assert record.status == "error"
    output = math.ceil(len(BEHAVIOR.piece(0) + BEHAVIOR.piece(1)) / 4)
    if fmt is MESSAGES:
        # message_start's counts are the provider's own: charged as partial usage.
        assert record.usage_source == "partial"
        assert record.input_tokens == BEHAVIOR.input_tokens
        assert record.cache_write_tokens == BEHAVIOR.cache_write_tokens
    else:
        assert record.usage_source == "estimated"
    assert record.output_tokens == output
    assert await spent(ledger) == record.cost > 0


@pytest.mark.parametrize("policy", ["charge_observed", "release"])
async def test_client_disconnect_mid_stream(
    fmt: Format,
    policy: str,
    build: Build,
    ledger: SQLiteLedger,
    key: str,
    provider: tuple[FakeProvider, str],
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(**{**_fields(BEHAVIOR), "delay": 0.05, "events": 20})

    def after_first_piece(sent: list[Any]) -> bool:
        return any(BEHAVIOR.piece(0).encode() in m.get("body", b"") for m in sent)

    ex = await call(
        build(disconnect=policy),
        fmt.path,
        json_body=fmt.body(stream=True),
        headers=auth(fmt, key),
        disconnect=after_first_piece,
    )
    assert not ex.complete
    [record] = await ledger.usage()
    assert record.status == "incomplete"
    if policy == "release":
        assert await spent(ledger) == 0
    else:
        assert await spent(ledger) == record.cost > 0


async def test_client_disconnect_before_first_chunk_charges_the_prompt(
    build: Build, ledger: SQLiteLedger, key: str, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(first_event_delay=5)
    exchange = Exchange()
    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: call(
                build(),
                CHAT.path,
                json_body=CHAT.body(stream=True),
                headers=auth(CHAT, key),
                exchange=exchange,
            )
        )
        with anyio.fail_after(2):
            while not fake.requests:  # noqa: ASYNC110 - the fake exposes only a list
                await anyio.sleep(0.01)
        exchange.disconnect()
    assert exchange.sent == []
    [record] = await ledger.usage()
    assert record.status == "incomplete"
    # The provider had the prompt: charged at the prompt estimate, no output.
    assert record.usage_source == "estimated"
    assert record.output_tokens == 0
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=record.input_tokens)) > 0


def _fields(behavior: FakeBehavior) -> dict[str, Any]:
    return {f: getattr(behavior, f) for f in behavior.__dataclass_fields__}


# -- official SDKs against gateway-made errors ---------------------------------------------------

CHAT_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
MESSAGES_PARAM: list[MessageParam] = [{"role": "user", "content": "hello"}]


async def test_sdk_error_classes_for_gateway_errors(build: Build, ledger: SQLiteLedger) -> None:
    await ledger.set_budget("user:alice", limit=Decimal(1))
    good, _ = await new_key(ledger)
    limited, _ = await new_key(ledger, rpm=1)
    other_models, _ = await new_key(ledger, allowed_models=("another-model",))
    broke, broke_record = await new_key(ledger)
    await ledger.set_budget(f"key:{broke_record.key_id}", limit=Decimal("0.000000001"))
    requests = 0
    app = build()

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        nonlocal requests
        if scope["type"] == "http":
            requests += 1
        await app(scope, receive, send)

    async with serve(counting) as url:

        def oai(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2)

        def ant(key: str) -> anthropic.AsyncAnthropic:
            return anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=2)

        cases: list[tuple[str, type[openai.APIStatusError], type[anthropic.APIStatusError]]] = [
            ("gk-wrong-key", openai.AuthenticationError, anthropic.AuthenticationError),
            (other_models, openai.PermissionDeniedError, anthropic.PermissionDeniedError),
            (broke, openai.APIStatusError, anthropic.APIStatusError),
        ]
        for key, openai_error, anthropic_error in cases:
            before = requests
            async with oai(key) as client:
                with pytest.raises(openai_error) as caught:
                    await client.chat.completions.create(model="test-model", messages=CHAT_MESSAGES)
            assert requests == before + 1  # not retried, even with max_retries=2
            async with ant(key) as anthropic_client:
                with pytest.raises(anthropic_error) as caught_a:
                    await anthropic_client.messages.create(
                        model="test-model", max_tokens=10, messages=MESSAGES_PARAM
                    )
            assert requests == before + 2  # neither SDK retried
            assert caught.value.status_code == caught_a.value.status_code
        assert caught.value.status_code == 402
        async with oai(limited) as client:
            client = client.with_options(max_retries=0)
            await client.chat.completions.create(model="test-model", messages=CHAT_MESSAGES)
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="test-model", messages=CHAT_MESSAGES)
        async with oai(good) as client:
            stream = await client.chat.completions.create(
                model="test-model", messages=CHAT_MESSAGES, stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == BEHAVIOR.output_text


async def test_events_arrive_one_by_one_through_the_whole_stack(
    build: Build, key: str, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    gap = 0.08
    fake.behavior = FakeBehavior(events=4, delay=gap)
    async with serve(build()) as url:
        arrivals: list[float] = []
        async with anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0) as client:
            start = time.monotonic()
            async with client.messages.stream(
                model="test-model", max_tokens=10, messages=MESSAGES_PARAM
            ) as stream:
                async for _ in stream.text_stream:
                    arrivals.append(time.monotonic() - start)
    assert len(arrivals) == 4
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Not buffered into one burst (one gap may shrink if a busy machine stalls a read).
    assert sum(g > gap * 0.5 for g in gaps) >= len(gaps) - 1, gaps
