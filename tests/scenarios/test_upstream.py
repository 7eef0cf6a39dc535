"""Upstream failures through the real stack: refund before the first byte, charge what was
consumed after it, never a silent $0, never a live hold left behind."""

from __future__ import annotations

import json
import socket
from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import gateway_routes
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Upstream
from gatewaykit.usage import Usage
from tests.asgi import call
from tests.scenarios.conftest import PRICE, UPSTREAM_KEY, Build, Scripted, new_key, spent

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"


def body(path: str, *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    if path == RESPONSES:
        data: dict[str, Any] = {"model": "test-model", "input": "hello there"}
    else:
        data = {"model": "test-model", "messages": [{"role": "user", "content": "hello there"}]}
    if path == MESSAGES:
        data["max_tokens"] = 100
    return {**data, "stream": stream, **extra}


async def keyed(ledger: SQLiteLedger) -> dict[str, str]:
    await ledger.set_budget("user:alice", limit=Decimal(1))
    key, _ = await new_key(ledger)
    return {"authorization": f"Bearer {key}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES])
@pytest.mark.parametrize("stream", [True, False])
async def test_connect_refused_is_502_and_refunds(
    build: Build, ledger: SQLiteLedger, path: str, stream: bool
) -> None:
    headers = await keyed(ledger)
    app = build(base=f"http://127.0.0.1:{free_port()}")
    ex = await call(app, path, json_body=body(path, stream=stream), headers=headers)
    assert ex.status == 502
    if path == MESSAGES:
        assert ex.json()["error"]["type"] == "api_error"
    else:
        assert ex.json()["error"]["type"] == "api_error"
    assert await spent(ledger) == 0
    [record] = await ledger.usage()
    assert record.status == "error"


async def test_timeout_before_first_chunk_is_504_and_refunds(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(first_byte_delay=2)
    headers = await keyed(ledger)
    app = build(routes={"first_chunk_timeout": 0.2})
    ex = await call(app, CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 504
    assert await spent(ledger) == 0


@pytest.mark.parametrize(
    ("upstream_status", "client_status"), [(500, 500), (429, 429), (401, 502), (403, 502)]
)
@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_upstream_error_statuses_refund(
    build: Build,
    ledger: SQLiteLedger,
    provider: tuple[FakeProvider, str],
    path: str,
    upstream_status: int,
    client_status: int,
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(fail_status=upstream_status, retry_after="7")
    headers = await keyed(ledger)
    ex = await call(build(), path, json_body=body(path), headers=headers)
    assert ex.status == client_status
    error = ex.json()
    if path == MESSAGES:
        assert error["type"] == "error"
        assert "type" in error["error"]
    else:
        assert "message" in error["error"]
    if upstream_status == 429:
        assert ex.headers["retry-after"] == "7"
    assert await spent(ledger) == 0
    [record] = await ledger.usage()
    assert record.status == "error"


def chat_chunk(content: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    data: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "test-model"}
    data["choices"] = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data)}\n\n".encode()


async def test_usage_reported_then_the_connection_drops_is_charged_the_usage(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str]
) -> None:
    upstream, url = scripted
    upstream.chunks = [
        chat_chunk("hello"),
        chat_chunk(usage={"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}),
    ]
    upstream.drop = True
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 200
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=30, output_tokens=7))


async def test_stream_ending_without_final_event_is_charged_observed_not_zero(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str]
) -> None:
    upstream, url = scripted
    upstream.chunks = [chat_chunk("x" * 40)]
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 200
    assert b"error" in ex.chunks[-1]  # told in-band
    [record] = await ledger.usage()
    assert record.status == "error"
    assert record.output_tokens == 10
    assert await spent(ledger) == record.cost > 0


@pytest.mark.parametrize(
    "chunks",
    [
        [b"<html>bad gateway</html>"],
        [b"data: {not json\n\n"],
        [b""],
    ],
    ids=["html", "bad-json", "empty"],
)
async def test_malformed_stream_before_any_output_refunds(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str], chunks: list[bytes]
) -> None:
    upstream, url = scripted
    upstream.chunks = chunks
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 502
    assert ex.json()["error"]["type"] == "api_error"
    assert await spent(ledger) == 0


async def test_malformed_event_mid_stream_is_charged_what_was_consumed(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str]
) -> None:
    upstream, url = scripted
    upstream.chunks = [chat_chunk("y" * 8), b"data: {broken\n\n", chat_chunk("z" * 8)]
    upstream.gap = 0.05
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 200
    [record] = await ledger.usage()
    assert record.status == "error"
    assert await spent(ledger) == record.cost > 0


@pytest.mark.parametrize(
    "path",
    [
        CHAT,
        MESSAGES,
        RESPONSES,
    ],
)
async def test_zero_output_usage_charges_the_input_only(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str], path: str
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=0, input_tokens=33)
    headers = await keyed(ledger)
    ex = await call(build(), path, json_body=body(path), headers=headers)
    assert ex.status == 200
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=33, output_tokens=0))
    [record] = await ledger.usage()
    assert (record.status, record.usage_source, record.output_tokens) == ("success", "provider", 0)


@pytest.mark.parametrize("stream", [True, False])
async def test_overrun_is_charged_in_full_beyond_the_limit(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str], stream: bool
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=5_000_000)  # $5 against a $1 budget
    headers = await keyed(ledger)
    ex = await call(build(), CHAT, json_body=body(CHAT, stream=stream), headers=headers)
    assert ex.status == 200
    cost = PRICE.cost(Usage(input_tokens=5_000_000, output_tokens=3))
    assert await spent(ledger) == cost > Decimal(1)
    ex = await call(build(), CHAT, json_body=body(CHAT, stream=stream), headers=headers)
    assert ex.status == 402  # the next request sees the overrun
    status = await ledger.status("user:alice")
    assert status is not None
    assert status.remaining is not None
    assert status.remaining < 0


async def test_absurd_reported_usage_never_leaves_a_live_hold(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    """A provider reporting more tokens than any ledger can price must not break
    settlement: the hold is closed (here: charged in full) and the request recorded."""
    fake, _ = provider
    fake.behavior = FakeBehavior(events=1, input_tokens=10**17)
    headers = await keyed(ledger)
    ex = await call(build(), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 200
    assert await ledger.holds() == []
    [record] = await ledger.usage()
    assert record.error
    assert await spent(ledger) > 0


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"input_tokens": 30, "output_tokens": 7},
        {"prompt_tokens": "30", "completion_tokens": "7"},
    ],
    ids=["empty", "other-field-names", "strings"],
)
async def test_unreadable_usage_is_never_charged_as_zero(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str], usage: dict[str, Any]
) -> None:
    upstream, url = scripted
    upstream.chunks = [chat_chunk("x" * 40), chat_chunk(usage=usage), b"data: [DONE]\n\n"]
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 200
    [record] = await ledger.usage()
    assert record.usage_source != "provider" or record.output_tokens > 0
    assert await spent(ledger) > 0


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_unreadable_usage_in_a_json_response_is_never_charged_as_zero(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str], path: str
) -> None:
    upstream, url = scripted
    if path == CHAT:
        payload: dict[str, Any] = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "x" * 40}}],
            "usage": {},
        }
    else:
        payload = {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "x" * 40}],
            "usage": {},
        }
    upstream.chunks = [json.dumps(payload).encode()]
    headers = await keyed(ledger)
    ex = await call(build(base=url), path, json_body=body(path, stream=False), headers=headers)
    assert ex.status == 200
    assert await spent(ledger) > 0


@pytest.mark.parametrize("stream", [True, False])
async def test_fallback_after_failed_attempts_charges_once(
    ledger: SQLiteLedger,
    client: httpx.AsyncClient,
    provider: tuple[FakeProvider, str],
    scripted: tuple[Scripted, str],
    stream: bool,
) -> None:
    """Refused, then 503, then served: one usage record and the served attempt's usage."""
    fake, url = provider
    fake.behavior = FakeBehavior(events=2, input_tokens=11)
    failing, failing_url = scripted
    failing.status = 503
    failing.chunks = [b'{"error": {"message": "overloaded"}}']
    mode = StandaloneMode(
        ledger,
        prices={"test-model": PRICE},
        upstreams=[
            Upstream(f"http://127.0.0.1:{free_port()}/v1", api_key=UPSTREAM_KEY),
            Upstream(f"{failing_url}/v1", api_key=UPSTREAM_KEY),
            Upstream(f"{url}/v1", api_key=UPSTREAM_KEY),
        ],
    )
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    headers = await keyed(ledger)
    ex = await call(app, CHAT, json_body=body(CHAT, stream=stream), headers=headers)
    assert ex.status == 200
    assert failing.requests == 1
    assert len(fake.requests) == 1
    [record] = await ledger.usage()
    assert record.status == "success"
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=11, output_tokens=2))


USAGE_30_7 = {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}


@pytest.mark.parametrize(
    "tail",
    [
        [],  # some compatible servers end without [DONE]
        [b'data: {"error": {"message": "late failure"}}\n\n'],
        [b"data: [DONE]\n\n", b"data: trailing garbage\n\n"],
    ],
    ids=["no-done", "error-after-usage", "garbage-after-done"],
)
async def test_usage_then_an_odd_ending_is_charged_the_usage_once(
    build: Build,
    ledger: SQLiteLedger,
    scripted: tuple[Scripted, str],
    tail: list[bytes],
) -> None:
    upstream, url = scripted
    upstream.chunks = [chat_chunk("hello"), chat_chunk(usage=USAGE_30_7), *tail]
    upstream.gap = 0.02
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 200
    [record] = await ledger.usage()
    assert record.usage_source == "provider"
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=30, output_tokens=7))


@pytest.mark.parametrize("policy", ["estimate", "hold", "allow_free", "fail"])
async def test_stream_without_usage_under_each_policy_exactly(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str], policy: str
) -> None:
    upstream, url = scripted
    upstream.chunks = [chat_chunk("x" * 21), b"data: [DONE]\n\n"]  # 21 chars: 6 tokens
    headers = await keyed(ledger)
    request = body(CHAT, max_tokens=100)  # "hello there": 3 prompt tokens estimated
    ex = await call(build(base=url, missing_usage=policy), CHAT, json_body=request, headers=headers)
    assert ex.status == 200
    [record] = await ledger.usage()
    assert record.status == "no_usage"
    expected = {
        "estimate": PRICE.cost(Usage(input_tokens=3, output_tokens=6)),
        "fail": PRICE.cost(Usage(input_tokens=3, output_tokens=6)),
        "hold": PRICE.cost(Usage(input_tokens=3, output_tokens=100)),
        "allow_free": Decimal(0),
    }[policy]
    assert await spent(ledger) == expected == record.cost
    assert (record.error is not None) == (policy == "fail")
    assert record.usage_source == ("none" if policy == "allow_free" else "estimated")


async def test_a_stream_request_answered_with_json_is_passed_on_and_charged(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str]
) -> None:
    """The provider served (and billed) it as one JSON body: never a refund of real usage."""
    upstream, url = scripted
    upstream.content_type = b"application/json"
    payload = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 7},
    }
    upstream.chunks = [json.dumps(payload).encode()]
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT, stream=True), headers=headers)
    assert ex.status == 200
    assert ex.json() == payload
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=30, output_tokens=7))
    [record] = await ledger.usage()
    assert (record.status, record.usage_source) == ("success", "provider")


async def test_a_huge_upstream_error_body_is_cut_not_buffered(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str]
) -> None:
    upstream, url = scripted
    upstream.status = 500
    upstream.content_type = b"application/json"
    upstream.chunks = [b"x" * (256 * 1024)] * 12  # 3 MiB
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 500
    assert len(ex.body) == 1024 * 1024
    assert await spent(ledger) == 0
