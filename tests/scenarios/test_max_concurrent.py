"""Caps on requests in flight, through the real stack with the official SDKs: a key's
``max_concurrent`` and ``StandaloneMode(user_max_concurrent=...)`` refuse with 429 in each
format's envelope, with ``Retry-After``; a finished request frees its slot."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import openai
import pytest

from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.testing import FakeBehavior, FakeProvider
from tests.adapters.conftest import serve
from tests.scenarios.conftest import Build, new_key

pytestmark = pytest.mark.anyio

HELLO: Any = [{"role": "user", "content": "Say hello"}]


@contextlib.asynccontextmanager
async def sdks(app: Any, key: str) -> AsyncIterator[tuple[openai.AsyncOpenAI, Any]]:
    async with (
        serve(app) as base,
        openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0) as oai,
        anthropic.AsyncAnthropic(base_url=base, api_key=key, max_retries=0) as ant,
    ):
        yield oai, ant


async def test_a_keys_cap_refuses_with_429_in_each_envelope(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=5, delay=0.2)  # each stream lasts a second
    key, record = await new_key(ledger, max_concurrent=2)
    async with sdks(build(), key) as (oai, ant), contextlib.AsyncExitStack() as open_streams:
        streams = [
            await open_streams.enter_async_context(
                oai.chat.completions.with_streaming_response.create(
                    model="test-model", messages=HELLO, stream=True
                )
            )
            for _ in range(2)
        ]
        assert [s.http_response.status_code for s in streams] == [200, 200]

        with pytest.raises(openai.RateLimitError) as chat:
            await oai.chat.completions.create(model="test-model", messages=HELLO)
        assert chat.value.response.headers["retry-after"] == "1"
        body: Any = chat.value.body
        assert body["type"] == "rate_limit_error"
        assert body["scope"] == f"key:{record.key_id}"
        assert body["max_concurrent"] == 2
        with pytest.raises(anthropic.RateLimitError) as messages:
            await ant.messages.create(model="test-model", max_tokens=10, messages=HELLO)
        assert messages.value.response.headers["retry-after"] == "1"
        assert messages.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]

        for stream in streams:
            async for _ in stream.iter_bytes():
                pass
    # Both streams were settled: their slots are free.
    async with sdks(build(), key) as (oai, _):
        await oai.chat.completions.create(model="test-model", messages=HELLO)
    assert len(fake.requests) == 3  # the refused requests never reached the provider


async def test_a_users_cap_spans_their_keys(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=5, delay=0.2)  # each stream lasts a second
    first, _ = await new_key(ledger)
    second, _ = await new_key(ledger)
    app = build(user_max_concurrent=1)
    async with sdks(app, first) as (oai, _), sdks(app, second) as (_, ant):
        async with oai.chat.completions.with_streaming_response.create(
            model="test-model", messages=HELLO, stream=True
        ) as streamed:
            with pytest.raises(anthropic.RateLimitError) as refused:
                await ant.messages.create(model="test-model", max_tokens=10, messages=HELLO)
            assert refused.value.body["error"]["message"].startswith(  # type: ignore[index]
                "too many requests in flight for user:alice"
            )
            async for _ in streamed.iter_bytes():
                pass
        await ant.messages.create(model="test-model", max_tokens=10, messages=HELLO)
