"""The fake provider itself, in-process through httpx.ASGITransport."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest

from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.usage import Usage

pytestmark = pytest.mark.anyio


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeProvider, httpx.AsyncClient]]:
    provider = FakeProvider(
        behavior=FakeBehavior(events=2, input_tokens=7, cache_read_tokens=3),
        behaviors={"failing": FakeBehavior(fail_status=503)},
        api_key="sk-fake",
    )
    transport = httpx.ASGITransport(app=provider)
    headers = {"authorization": "Bearer sk-fake"}
    async with httpx.AsyncClient(transport=transport, base_url="http://f", headers=headers) as c:
        yield provider, c


async def test_non_streaming_usage_in_each_format(
    fake: tuple[FakeProvider, httpx.AsyncClient],
) -> None:
    provider, client = fake
    chat = (await client.post("/v1/chat/completions", json={"model": "m"})).json()
    assert chat["usage"]["prompt_tokens"] == 10  # cached tokens are inside the prompt
    assert chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 3
    assert chat["choices"][0]["message"]["content"] == "tok0 tok1 "
    messages = (await client.post("/v1/messages", json={"model": "m"})).json()
    assert messages["usage"]["input_tokens"] == 7  # ... and outside it for Anthropic
    assert messages["usage"]["cache_read_input_tokens"] == 3
    responses = (await client.post("/v1/responses", json={"model": "m"})).json()
    assert responses["usage"]["input_tokens_details"]["cached_tokens"] == 3
    assert provider.behavior.expected_usage("openai_chat") == Usage(7, 2, 3, 0)
    assert [r.path for r in provider.requests] == [
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/responses",
    ]


async def test_streams_end_with_their_terminal_event(
    fake: tuple[FakeProvider, httpx.AsyncClient],
) -> None:
    _, client = fake
    body = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    chat = (await client.post("/v1/chat/completions", json=body)).content
    assert chat.endswith(b"data: [DONE]\n\n")
    assert b'"completion_tokens":2' in chat
    without = await client.post("/v1/chat/completions", json={**body, "stream_options": {}})
    assert b'"completion_tokens"' not in without.content
    messages = (await client.post("/v1/messages", json=body)).content
    assert messages.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    responses = (await client.post("/v1/responses", json=body)).content
    assert b"event: response.completed" in responses
    assert b"[DONE]" not in responses


async def test_auth_model_behaviors_and_header_override(
    fake: tuple[FakeProvider, httpx.AsyncClient],
) -> None:
    _, client = fake
    denied = await client.post("/v1/messages", json={"model": "m"}, headers={"authorization": ""})
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    failing = await client.post("/v1/chat/completions", json={"model": "failing"})
    assert failing.status_code == 503
    override = {"x-fake-behavior": json.dumps({"fail_status": 418, "fail_body": "teapot"})}
    teapot = await client.post("/v1/chat/completions", json={"model": "m"}, headers=override)
    assert (teapot.status_code, teapot.text) == (418, "teapot")
    unknown = {"x-fake-behavior": json.dumps({"no_such_knob": 1})}
    rejected = await client.post("/v1/chat/completions", json={"model": "m"}, headers=unknown)
    assert rejected.status_code == 400
    assert "x-fake-behavior" in rejected.json()["error"]["message"]
    bad = await client.post("/v1/chat/completions", content=b"{")
    assert bad.status_code == 400
    missing = await client.post("/v1/nothing", json={"model": "m"})
    assert missing.status_code == 404


async def test_malformed_bodies(fake: tuple[FakeProvider, httpx.AsyncClient]) -> None:
    _, client = fake
    broken = {"x-fake-behavior": json.dumps({"malformed": "json"})}
    answer = await client.post("/v1/chat/completions", json={"model": "m"}, headers=broken)
    with pytest.raises(ValueError, match="Expecting"):
        answer.json()
    html = {"x-fake-behavior": json.dumps({"malformed": "sse"})}
    answer = await client.post("/v1/messages", json={"model": "m"}, headers=html)
    assert answer.headers["content-type"] == "text/html"


async def test_stored_responses_and_conversations_are_billed_again(
    fake: tuple[FakeProvider, httpx.AsyncClient],
) -> None:
    provider, client = fake
    first = (await client.post("/v1/responses", json={"model": "m"})).json()
    # 7 input + 3 cached + 2 output: what a continuation of it is billed for.
    assert provider.stored[first["id"]] == 12
    chained = await client.post(
        "/v1/responses", json={"model": "m", "previous_response_id": first["id"]}
    )
    usage = chained.json()["usage"]
    assert usage["input_tokens"] == 12 + 10  # the stored context, then its own prompt
    assert provider.stored[chained.json()["id"]] == 12 + 10 + 2
    body = {"model": "m", "stream": True, "previous_response_id": chained.json()["id"]}
    streamed = (await client.post("/v1/responses", json=body)).content
    assert b'"input_tokens":34' in streamed
    unstored = (await client.post("/v1/responses", json={"model": "m", "store": False})).json()
    assert unstored["id"] not in provider.stored
    missing = await client.post(
        "/v1/responses", json={"model": "m", "previous_response_id": "resp_nope"}
    )
    assert missing.status_code == 400
    assert "not found" in missing.json()["error"]["message"]
    assert (
        await client.post("/v1/responses", json={"model": "m", "conversation": "c"})
    ).status_code == 404
    provider.conversations["conv_1"] = 100
    turn = (
        await client.post("/v1/responses", json={"model": "m", "conversation": {"id": "conv_1"}})
    ).json()
    assert turn["usage"]["input_tokens"] == 110
    assert provider.conversations["conv_1"] == 112
