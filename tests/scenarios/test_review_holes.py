"""Regression tests for the review of the rebuilt request path (issue 11 §3–§5, §7; issue 19).

Each test drives the real stack (GatewayMiddleware + StandaloneMode + the adapters + a real
SQLiteLedger) through the raw ASGI driver, in front of upstreams on real sockets: the fake
provider, the scripted upstream, or a raw TCP server that misbehaves at the byte level.
The ``ledger`` fixture checks afterwards that ``check()`` is clean and no hold is live.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import gateway_routes
from gatewaykit.errors import ConfigurationError, LedgerUnavailableError
from gatewaykit.ledger.base import HoldState, Ledger
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes import standalone_settlement
from gatewaykit.modes.platform import PlatformMode
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.outbox import RetryPolicy, SQLiteOutbox
from gatewaykit.testing import FakeBehavior, FakeControlPlane, FakeProvider
from gatewaykit.upstream import Upstream
from gatewaykit.usage import Usage
from tests.asgi import Exchange, call
from tests.scenarios.conftest import PRICE, UPSTREAM_KEY, Build, Scripted, spent
from tests.scenarios.test_upstream import body, chat_chunk, free_port, keyed

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
RESPONSES = "/v1/responses"

#: "hello there" is 11 characters: the prompt is estimated at 3 tokens.
PROMPT_ESTIMATE = 3
USAGE_30_7 = {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}


def app_for(ledger: Any, client: Any, upstreams: list[Upstream], **routes: Any) -> Starlette:
    """The real stack over ``ledger`` (which may be a wrapper) and explicit upstreams."""
    mode = StandaloneMode(ledger, prices={"test-model": PRICE}, upstreams=upstreams)
    return Starlette(
        routes=gateway_routes(client=client, **routes),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )


def both_providers(*urls: str, key: str = UPSTREAM_KEY) -> list[Upstream]:
    """One OpenAI and one Anthropic upstream per base URL, tried in the order given."""
    return [Upstream(f"{url}/v1", api_key=key, provider="openai") for url in urls] + [
        Upstream(url, api_key=key, provider="anthropic") for url in urls
    ]


def openai_error(ex: Exchange) -> dict[str, Any]:
    error = ex.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    return error  # type: ignore[no-any-return]


def anthropic_error(ex: Exchange) -> dict[str, Any]:
    data = ex.json()
    assert data["type"] == "error", data
    assert set(data["error"]) >= {"type", "message"}, data
    return data["error"]  # type: ignore[no-any-return]


def envelope_error(path: str, ex: Exchange) -> dict[str, Any]:
    return anthropic_error(ex) if path == MESSAGES else openai_error(ex)


async def one_record(ledger: SQLiteLedger) -> Any:
    [record] = await ledger.usage()
    return record


# -- §4: keep-alives and comments never commit a stream ----------------------------------------

KEEP_ALIVE = b": keep-alive\n\n"
PRELUDES = {
    "comment": KEEP_ALIVE,
    "blank": b"\n\n",
    "garbage": b"this line is no field of any event\n\n",
}
IN_BAND_ERRORS = {
    CHAT: b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n',
    MESSAGES: (
        b"event: error\n"
        b'data: {"type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}}'
        b"\n\n"
    ),
    RESPONSES: (
        b'event: error\ndata: {"type": "error", "code": "server_error", "message": "overloaded"}'
        b"\n\n"
    ),
}


@pytest.mark.parametrize("ending", ["drop", "in-band-error"])
@pytest.mark.parametrize(
    ("path", "prelude"),
    [
        (CHAT, "comment"),
        (CHAT, "blank"),
        (CHAT, "garbage"),
        (MESSAGES, "comment"),
        (RESPONSES, "comment"),
    ],
)
async def test_a_keep_alive_then_a_failure_before_any_output_refunds(
    build: Build,
    ledger: SQLiteLedger,
    scripted: tuple[Scripted, str],
    path: str,
    prelude: str,
    ending: str,
) -> None:
    """A comment, blank or unknown line is no output: the failure after it is still a
    failure before the first chunk — the error status in the envelope, the hold refunded."""
    upstream, url = scripted
    upstream.chunks = [PRELUDES[prelude]]
    if ending == "drop":
        upstream.drop = True
    else:
        upstream.chunks.append(IN_BAND_ERRORS[path])
    upstream.gap = 0.02  # the prelude arrives as a read of its own
    headers = await keyed(ledger)
    ex = await call(build(base=url), path, json_body=body(path), headers=headers)
    assert ex.status == 502  # one response start (Exchange.start checks), not a 200
    error = envelope_error(path, ex)
    assert error["type"] == "api_error"
    if ending == "in-band-error":
        assert "overloaded" in error["message"]
    assert PRELUDES[prelude] not in ex.body
    assert await spent(ledger) == 0
    record = await one_record(ledger)
    assert (record.status, record.cost) == ("error", 0)


@pytest.mark.parametrize("ending", ["drop", "in-band-error"])
@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_a_keep_alive_then_a_failure_falls_back_to_the_next_upstream(
    ledger: SQLiteLedger,
    client: Any,
    provider: tuple[FakeProvider, str],
    scripted: tuple[Scripted, str],
    path: str,
    ending: str,
) -> None:
    fake, fake_url = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=11)
    upstream, url = scripted
    upstream.chunks = [KEEP_ALIVE]
    if ending == "drop":
        upstream.drop = True
    else:
        upstream.chunks.append(IN_BAND_ERRORS[path])
    upstream.gap = 0.02
    app = app_for(ledger, client, both_providers(url, fake_url))
    headers = await keyed(ledger)
    ex = await call(app, path, json_body=body(path), headers=headers)
    assert ex.status == 200
    assert (upstream.requests, len(fake.requests)) == (1, 1)
    assert b"keep-alive" not in ex.body  # nothing of the failed attempt reached the client
    assert b"tok0" in ex.body
    final = b"data: [DONE]\n\n" if path == CHAT else b"message_stop"
    assert final in ex.chunks[-1]
    record = await one_record(ledger)
    assert (record.status, record.usage_source) == ("success", "provider")
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=11, output_tokens=3))


async def test_comments_before_the_first_event_reach_the_client_with_it_in_order(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str]
) -> None:
    upstream, url = scripted
    comments = [KEEP_ALIVE, b": ping 2\n\n"]
    first = chat_chunk("hello")
    upstream.chunks = [*comments, first, chat_chunk(usage=USAGE_30_7), b"data: [DONE]\n\n"]
    upstream.gap = 0.02
    headers = await keyed(ledger)
    request = body(CHAT, stream_options={"include_usage": True})  # nothing is cut out
    ex = await call(build(base=url), CHAT, json_body=request, headers=headers)
    assert ex.status == 200
    assert ex.body == b"".join(upstream.chunks)  # byte-exact, in order
    # Held back until the first real event, then sent with it.
    assert ex.chunks[0].startswith(b"".join(comments) + first)
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=30, output_tokens=7))


# -- §5: first_chunk_timeout never covers the settle ----------------------------------------


class SlowSettle:
    """A real ledger whose settle takes ``delay`` seconds longer (a slow disk, a busy
    PostgreSQL)."""

    def __init__(self, ledger: SQLiteLedger, delay: float) -> None:
        self._ledger = ledger
        self.delay = delay
        self.settles = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def settle(self, *args: Any, **kwargs: Any) -> Any:
        self.settles += 1
        await anyio.sleep(self.delay)
        return await self._ledger.settle(*args, **kwargs)


FIRST_CHUNK_TIMEOUT = 0.2
SLOW_SETTLE = 0.6  # three times the first-chunk timeout


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES])
async def test_a_slow_settle_after_a_stream_started_is_no_first_chunk_timeout(
    ledger: SQLiteLedger, client: Any, provider: tuple[FakeProvider, str], path: str
) -> None:
    fake, url = provider
    fake.behavior = FakeBehavior(events=2, input_tokens=20)
    slow = SlowSettle(ledger, SLOW_SETTLE)
    app = app_for(slow, client, both_providers(url, url), first_chunk_timeout=FIRST_CHUNK_TIMEOUT)
    headers = await keyed(ledger)
    ex = await call(app, path, json_body=body(path), headers=headers)
    assert ex.status == 200  # exactly one response start (Exchange.start checks)
    assert len(fake.requests) == 1  # no fallback to the second upstream
    assert slow.settles == 1
    final = {CHAT: b"[DONE]", MESSAGES: b"message_stop", RESPONSES: b"response.completed"}[path]
    assert final in ex.chunks[-1]
    assert b"event: error" not in ex.body
    assert b'data: {"error"' not in ex.body
    record = await one_record(ledger)
    assert (record.status, record.usage_source) == ("success", "provider")
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=20, output_tokens=2))


async def test_a_slow_settle_of_a_stream_answered_with_json_is_no_first_chunk_timeout(
    ledger: SQLiteLedger,
    client: Any,
    provider: tuple[FakeProvider, str],
    scripted: tuple[Scripted, str],
) -> None:
    fake, fake_url = provider
    upstream, url = scripted
    upstream.content_type = b"application/json"
    payload = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": USAGE_30_7,
    }
    upstream.chunks = [json.dumps(payload).encode()]
    slow = SlowSettle(ledger, SLOW_SETTLE)
    app = app_for(
        slow, client, both_providers(url, fake_url), first_chunk_timeout=FIRST_CHUNK_TIMEOUT
    )
    headers = await keyed(ledger)
    ex = await call(app, CHAT, json_body=body(CHAT, stream=True), headers=headers)
    assert ex.status == 200
    assert ex.json() == payload
    assert (upstream.requests, len(fake.requests)) == (1, 0)  # served once, no fallback
    assert slow.settles == 1
    record = await one_record(ledger)
    assert (record.status, record.usage_source) == ("success", "provider")
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=30, output_tokens=7))


# -- §7: usage that cannot be read, reported twice, or too large to read ----------------------

UNREADABLE_CHAT = {
    "negative": {"prompt_tokens": -5, "completion_tokens": 7},
    "float-next-to-int": {"prompt_tokens": 30, "completion_tokens": 7.0},
    "string-next-to-int": {"prompt_tokens": "30", "completion_tokens": 7},
    "negative-cached": {
        "prompt_tokens": 30,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": -1},
    },
}
UNREADABLE_ANTHROPIC = {
    "negative": {"input_tokens": -5, "output_tokens": 7},
    "float-next-to-int": {"input_tokens": 30, "output_tokens": 7.5},
    "string-next-to-int": {"input_tokens": 30, "output_tokens": "7"},
}
UNREADABLE_RESPONSES = {
    "negative": {"input_tokens": 30, "output_tokens": -7},
    "float-next-to-int": {"input_tokens": 30.0, "output_tokens": 7},
    "string-next-to-int": {"input_tokens": 30, "output_tokens": "7"},
}
TEXT = "x" * 40  # 40 characters of output: estimated at 10 tokens


def unreadable_stream(path: str, usage: dict[str, Any]) -> list[bytes]:
    """A complete stream whose only usage report is ``usage``."""
    if path == CHAT:
        return [chat_chunk(TEXT), chat_chunk(usage=usage), b"data: [DONE]\n\n"]
    if path == MESSAGES:

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        message = {"id": "msg_1", "type": "message", "role": "assistant", "content": []}
        return [
            event("message_start", {"message": {**message, "usage": usage}}),
            event(
                "content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": TEXT}}
            ),
            event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": usage}),
            event("message_stop", {}),
        ]
    response = {"id": "resp_1", "object": "response", "status": "completed", "usage": usage}
    return [
        b"event: response.output_text.delta\ndata: "
        + json.dumps({"type": "response.output_text.delta", "delta": TEXT}).encode()
        + b"\n\n",
        b"event: response.completed\ndata: "
        + json.dumps({"type": "response.completed", "response": response}).encode()
        + b"\n\n",
    ]


def unreadable_body(path: str, usage: dict[str, Any]) -> bytes:
    """A complete JSON answer whose usage is ``usage``."""
    if path == CHAT:
        payload: dict[str, Any] = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": TEXT}}],
        }
    elif path == MESSAGES:
        payload = {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": TEXT}],
        }
    else:
        payload = {
            "id": "resp_1",
            "object": "response",
            "output": [{"type": "message", "content": [{"type": "output_text", "text": TEXT}]}],
        }
    return json.dumps({**payload, "usage": usage}).encode()


UNREADABLE_CASES = [
    pytest.param(path, name, usage, id=f"{path.rsplit('/', 1)[1]}-{name}")
    for path, table in (
        (CHAT, UNREADABLE_CHAT),
        (MESSAGES, UNREADABLE_ANTHROPIC),
        (RESPONSES, UNREADABLE_RESPONSES),
    )
    for name, usage in table.items()
]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize(("path", "name", "usage"), UNREADABLE_CASES)
async def test_unreadable_token_counts_are_missing_usage_never_zero(
    build: Build,
    ledger: SQLiteLedger,
    scripted: tuple[Scripted, str],
    path: str,
    name: str,
    usage: dict[str, Any],
    stream: bool,
) -> None:
    """A negative, float or string count makes the whole usage object unreadable: the
    missing-usage policy (``estimate``) charges the prompt estimate plus the output seen,
    with source ``estimated`` — never the readable fields alone, never $0."""
    upstream, url = scripted
    if stream:
        upstream.chunks = unreadable_stream(path, usage)
    else:
        upstream.content_type = b"application/json"
        upstream.chunks = [unreadable_body(path, usage)]
    headers = await keyed(ledger)
    ex = await call(build(base=url), path, json_body=body(path, stream=stream), headers=headers)
    assert ex.status == 200
    record = await one_record(ledger)
    assert (record.status, record.usage_source) == ("no_usage", "estimated")
    assert (record.input_tokens, record.output_tokens) == (PROMPT_ESTIMATE, 10)
    expected = PRICE.cost(Usage(input_tokens=PROMPT_ESTIMATE, output_tokens=10))
    assert await spent(ledger) == record.cost == expected


async def test_usage_reported_twice_in_a_chat_stream_charges_the_larger_of_each_field(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str]
) -> None:
    upstream, url = scripted
    upstream.chunks = [
        chat_chunk("hello"),
        chat_chunk(usage={"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}),
        chat_chunk(usage={"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}),
        b"data: [DONE]\n\n",
    ]
    upstream.gap = 0.02
    headers = await keyed(ledger)
    ex = await call(build(base=url), CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 200
    record = await one_record(ledger)
    assert (record.usage_source, record.input_tokens, record.output_tokens) == ("provider", 30, 9)
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=30, output_tokens=9))


@pytest.mark.parametrize(
    ("path", "stream"),
    [(CHAT, False), (CHAT, True), (MESSAGES, False)],
    ids=["chat-json", "chat-stream-answered-json", "messages-json"],
)
async def test_a_json_answer_over_max_response_bytes_is_not_read_without_bound(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str], path: str, stream: bool
) -> None:
    """The upstream sends more than the limit, then stalls for 30 s: the gateway stops
    reading at the limit (it answers long before the stall ends), tells the client in the
    envelope, and charges the served-but-unreadable answer per the missing-usage policy."""
    upstream, url = scripted
    upstream.content_type = b"application/json"
    upstream.chunks = [b'{"usage": {"prompt_tokens": 30}, "pad": "' + b"x" * 8192, b'"}']
    upstream.gap = 30  # the rest of the body would come only after the test's deadline
    headers = await keyed(ledger)
    app = build(base=url, routes={"max_response_bytes": 1024})
    ex = await call(app, path, json_body=body(path, stream=stream), headers=headers, deadline=3)
    assert ex.status == 502
    error = envelope_error(path, ex)
    assert error["type"] == "api_error"
    assert "1024 bytes" in error["message"]
    assert b"xxxx" not in ex.body
    assert upstream.requests == 1  # served (and billed) by the provider: no second attempt
    record = await one_record(ledger)
    assert (record.status, record.usage_source) == ("no_usage", "estimated")
    assert (record.input_tokens, record.output_tokens) == (PROMPT_ESTIMATE, 0)
    assert await spent(ledger) == record.cost == PRICE.cost(Usage(input_tokens=PROMPT_ESTIMATE))


# -- §7: client input no HTTP client or encoder could send on --------------------------------


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize(
    ("name", "value"),
    [("anthropic-beta", "tools-2024-04-04\x7f"), ("anthropic-version", "2023-06-01\x7f")],
)
async def test_a_client_anthropic_header_with_0x7f_is_400_in_the_envelope(
    build: Build,
    ledger: SQLiteLedger,
    provider: tuple[FakeProvider, str],
    caplog: pytest.LogCaptureFixture,
    name: str,
    value: str,
    stream: bool,
) -> None:
    fake, _ = provider
    caplog.set_level(logging.DEBUG)
    headers = {**await keyed(ledger), name: value}
    ex = await call(build(), MESSAGES, json_body=body(MESSAGES, stream=stream), headers=headers)
    assert ex.status == 400
    error = anthropic_error(ex)
    assert error["type"] == "invalid_request_error"
    assert name in error["message"]
    assert fake.requests == []  # never sent on
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert [r for r in caplog.records if r.exc_info] == []  # no traceback at any level
    assert await spent(ledger) == 0
    record = await one_record(ledger)
    assert (record.status, record.cost) == ("error", 0)  # the hold was refunded


LONE_SURROGATE = b'"hi \\ud800 there"'
SURROGATE_PAIR = b'"hi \\ud83d\\ude00 there"'  # an escaped emoji: fine


def raw_body(path: str, text: bytes) -> bytes:
    if path == RESPONSES:
        return b'{"model": "test-model", "input": ' + text + b"}"
    tokens = b', "max_tokens": 10' if path == MESSAGES else b""
    return (
        b'{"model": "test-model", "messages": [{"role": "user", "content": '
        + text
        + b"}]"
        + tokens
        + b"}"
    )


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES])
async def test_a_lone_surrogate_escape_is_400_in_the_envelope(
    build: Build,
    ledger: SQLiteLedger,
    provider: tuple[FakeProvider, str],
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    fake, _ = provider
    headers = await keyed(ledger)
    ex = await call(build(), path, body=raw_body(path, LONE_SURROGATE), headers=headers)
    assert ex.status == 400
    assert envelope_error(path, ex)["type"] == "invalid_request_error"
    assert fake.requests == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert await ledger.usage() == []  # refused before anything was held
    # A surrogate *pair* is one character: served as usual.
    ex = await call(build(), path, body=raw_body(path, SURROGATE_PAIR), headers=headers)
    assert ex.status == 200
    assert len(fake.requests) == 1


# -- issue 19: no answer leaves before its charge is durable -----------------------------------


class SettleDown:
    """A real ledger whose settle fails for good: the store is unreachable by the time the
    request settles (it was up when the request was admitted)."""

    def __init__(self, ledger: SQLiteLedger) -> None:
        self._ledger = ledger
        self.settles = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def settle(self, *args: Any, **kwargs: Any) -> Any:
        self.settles += 1
        raise LedgerUnavailableError("store unreachable")


FINAL_EVENTS = {CHAT: b"[DONE]", MESSAGES: b"message_stop", RESPONSES: b"response.completed"}


@pytest.fixture
def quick_settle_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """StandaloneSettlement's settle retries, minus most of their waiting."""
    monkeypatch.setattr(standalone_settlement, "RETRY_DELAYS", (0.01, 0.01, 0.01))


async def expire_the_hold(ledger: Ledger, hold_id: str) -> None:
    """Wait for the hold's TTL to pass and the sweeper to expire it (as in production)."""
    with anyio.fail_after(3):
        while not await ledger.sweep():  # noqa: ASYNC110 - the sweeper is polled, like cron
            await anyio.sleep(0.05)
    hold = await ledger.get_hold(hold_id)
    assert hold is not None
    assert hold.state is HoldState.EXPIRED


@pytest.mark.usefixtures("quick_settle_retries")
@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES])
async def test_an_answer_whose_charge_cannot_be_recorded_is_withheld(
    ledger: SQLiteLedger,
    client: Any,
    provider: tuple[FakeProvider, str],
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    """Non-streaming: the body is the answer, so none of it leaves before the settle is
    durable. The settle fails for good (after the settlement's retries): the client gets a
    503 in the route's envelope instead, and the hold stays live for the sweeper."""
    fake, url = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=20)
    down = SettleDown(ledger)
    mode = StandaloneMode(
        down, prices={"test-model": PRICE}, upstreams=both_providers(url), hold_ttl=0.6
    )
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    headers = await keyed(ledger)
    ex = await call(app, path, json_body=body(path, stream=False), headers=headers)
    assert ex.status == 503  # one response start (Exchange.start checks): not the answer's
    error = envelope_error(path, ex)
    assert error["type"] == "api_error"
    assert "could not record" in error["message"]
    assert b"tok0" not in ex.body  # no byte of the answer
    assert len(fake.requests) == 1
    assert down.settles > 1  # retried before giving up
    assert "could not settle" in caplog.text
    hold = await ledger.get_hold(ex.headers["x-request-id"])
    assert hold is not None
    assert hold.state is HoldState.HELD  # left for the sweeper, never dropped
    assert await ledger.usage() == []
    await expire_the_hold(ledger, hold.hold_id)


@pytest.fixture
async def pg_ledger() -> AsyncIterator[Any]:
    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    async with fresh_schema("gk_holes") as schema, PostgresLedger(DSN, schema=schema) as store:
        yield store
        assert await store.check() == []
        assert await store.holds() == []


@pytest.mark.postgres
@pytest.mark.usefixtures("quick_settle_retries")
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_answer_whose_charge_cannot_be_recorded_is_withheld_on_postgres(
    pg_ledger: Any, client: Any, provider: tuple[FakeProvider, str], stream: bool
) -> None:
    fake, url = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=20)
    down = SettleDown(pg_ledger)
    mode = StandaloneMode(
        down, prices={"test-model": PRICE}, upstreams=both_providers(url), hold_ttl=1
    )
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    headers = await keyed(pg_ledger)
    ex = await call(app, CHAT, json_body=body(CHAT, stream=stream), headers=headers)
    if stream:
        assert ex.status == 200
        assert b"could not record" in ex.chunks[-1]
    else:
        assert ex.status == 503
        assert b"tok0" not in ex.body
    hold = await pg_ledger.get_hold(ex.headers["x-request-id"])
    assert hold is not None
    assert hold.state is HoldState.HELD
    assert await pg_ledger.usage() == []
    await expire_the_hold(pg_ledger, hold.hold_id)


@pytest.mark.usefixtures("quick_settle_retries")
@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES])
async def test_a_stream_whose_charge_cannot_be_recorded_ends_with_an_error_not_its_final_event(
    ledger: SQLiteLedger, client: Any, provider: tuple[FakeProvider, str], path: str
) -> None:
    fake, url = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=20)
    down = SettleDown(ledger)
    mode = StandaloneMode(
        down, prices={"test-model": PRICE}, upstreams=both_providers(url), hold_ttl=0.6
    )
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    headers = await keyed(ledger)
    ex = await call(app, path, json_body=body(path, stream=True), headers=headers)
    assert ex.status == 200
    assert ex.complete
    assert b"tok2" in ex.body  # the stream itself went out as it came
    last = ex.chunks[-1]
    assert b"could not record" in last
    assert b"error" in last
    if path == CHAT:
        # The in-band error ends a chat stream as OpenAI's errors do: then [DONE].
        assert ex.body.count(b"[DONE]") == 1
        assert last.index(b"could not record") < last.index(b"[DONE]")
    else:
        assert FINAL_EVENTS[path] not in ex.body
    assert down.settles > 1
    hold = await ledger.get_hold(ex.headers["x-request-id"])
    assert hold is not None
    assert hold.state is HoldState.HELD
    assert await ledger.usage() == []
    await expire_the_hold(ledger, hold.hold_id)


class LedgerDown:
    """A real ledger that can be taken down: every call fails while ``down`` is set."""

    def __init__(self, ledger: SQLiteLedger) -> None:
        self._ledger = ledger
        self.down = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._ledger, name)
        if not callable(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise LedgerUnavailableError("store unreachable")
            return await target(*args, **kwargs)

        return call


@pytest.mark.usefixtures("quick_settle_retries")
async def test_fail_open_still_serves_an_answer_whose_charge_cannot_be_booked(
    ledger: SQLiteLedger, client: Any, provider: tuple[FakeProvider, str]
) -> None:
    """``ledger_unavailable="fail_open"`` chose availability over the cap: a request
    admitted without a hold is served even when its charge cannot be booked afterwards
    (documented: the charge is lost and logged)."""
    fake, url = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=20)
    store = LedgerDown(ledger)
    mode = StandaloneMode(
        store,
        prices={"test-model": PRICE},
        upstreams=both_providers(url),
        ledger_unavailable="fail_open",
    )
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    headers = await keyed(ledger)
    request = body(CHAT, stream=False)
    assert (await call(app, CHAT, json_body=request, headers=headers)).status == 200  # cached
    store.down = True
    ex = await call(app, CHAT, json_body=request, headers=headers)
    assert ex.status == 200
    assert b"tok0" in ex.body
    store.down = False
    assert len(await ledger.usage()) == 1  # only the first request's charge


# -- §3: the provider credential and header values never leak --------------------------------

HEADER_SECRET = "hdr-SECRET-value-5150"
#: What the gateway is configured with, read from a file: the newline is stripped.
KEY_AS_READ = UPSTREAM_KEY + "\n"


class Misbehaving:
    """A raw TCP "provider" failing at the byte level, as set by ``mode``:

    ``silent``: reads the request, never answers (a read timeout before any byte);
    ``stall-mid-stream``: answers one event, then stays silent (a read timeout after it);
    ``reset-before-headers`` / ``reset-mid-stream`` / ``reset-mid-body``: resets the
    connection (TCP RST) before the response, after one event, inside a JSON body.
    """

    def __init__(self) -> None:
        self.mode = "silent"
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.requests.append(head + await reader.readexactly(length))
            mode = self.mode
            if mode in ("reset-mid-stream", "stall-mid-stream"):
                event = chat_chunk("hello")
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                    + f"{len(event):x}\r\n".encode()
                    + event
                    + b"\r\n"
                )
            elif mode == "reset-mid-body":
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b'content-length: 1000\r\n\r\n{"choices": [{"index": 0, '
                )
            await writer.drain()
            if mode.startswith("reset"):
                if mode != "reset-before-headers":
                    await anyio.sleep(0.05)  # let the bytes be read before the reset
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            await reader.read()  # silent until the gateway gives up and closes
        except (OSError, asyncio.IncompleteReadError):
            pass
        writer.close()


@pytest.fixture(scope="module")
async def misbehaving_server() -> AsyncIterator[tuple[Misbehaving, str]]:
    upstream = Misbehaving()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield upstream, f"http://127.0.0.1:{port}"


@pytest.fixture
def misbehaving(misbehaving_server: tuple[Misbehaving, str]) -> tuple[Misbehaving, str]:
    upstream, url = misbehaving_server
    upstream.mode = "silent"
    upstream.requests.clear()
    return upstream, url


@pytest.fixture(params=["aiohttp", "httpx"])
async def any_client(request: pytest.FixtureRequest, client: Any) -> AsyncIterator[Any]:
    """The default (aiohttp) upstream client, or an httpx.AsyncClient wrapped by gatewaykit."""
    if request.param == "aiohttp":
        yield client
    else:
        async with httpx.AsyncClient() as http:
            yield http


#: (what the upstream does, whether the request streams, committed before the failure)
TRANSPORT_FAILURES = [
    ("refused", True, False),
    ("refused", False, False),
    ("silent", True, False),
    ("silent", False, False),
    ("reset-before-headers", True, False),
    ("reset-before-headers", False, False),
    ("reset-mid-stream", True, True),
    ("stall-mid-stream", True, True),
    ("reset-mid-body", False, False),
]
FAILURE_IDS = [f"{mode}-{'stream' if stream else 'json'}" for mode, stream, _ in TRANSPORT_FAILURES]


def secret_upstreams(url: str) -> list[Upstream]:
    return [
        Upstream(f"{url}/v1", api_key=KEY_AS_READ, headers={"x-upstream-secret": HEADER_SECRET})
    ]


def failing_url(mode: str, misbehaving: tuple[Misbehaving, str]) -> str:
    upstream, url = misbehaving
    if mode == "refused":
        return f"http://127.0.0.1:{free_port()}"
    upstream.mode = mode
    return url


def rendered(record: logging.LogRecord) -> str:
    """All of a log record a handler could write out: message, arguments, the exception
    with its whole chain (suppressed contexts too) and stack."""
    parts = [record.getMessage(), repr(record.args), record.stack_info or ""]
    if record.exc_info and record.exc_info[1] is not None:
        parts.append(logging.Formatter().formatException(record.exc_info))
        seen: set[int] = set()
        pending: list[BaseException | None] = [record.exc_info[1]]
        while pending:
            exc = pending.pop()
            if exc is None or id(exc) in seen:
                continue
            seen.add(id(exc))
            parts += [str(exc), repr(exc), repr(getattr(exc, "args", ()))]
            pending += [exc.__cause__, exc.__context__]
    return "\n".join(parts)


def assert_no_secret(where: str, text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} in {where}"
        assert secret[4:-2] not in text, f"most of {secret!r} in {where}"


@pytest.mark.parametrize(("mode", "stream", "committed"), TRANSPORT_FAILURES, ids=FAILURE_IDS)
async def test_transport_failures_never_leak_the_key_or_a_header_value(
    ledger: SQLiteLedger,
    any_client: Any,
    misbehaving: tuple[Misbehaving, str],
    caplog: pytest.LogCaptureFixture,
    mode: str,
    stream: bool,
    committed: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = failing_url(mode, misbehaving)
    app = app_for(ledger, any_client, secret_upstreams(url), read_timeout=0.3)
    headers = await keyed(ledger)
    ex = await call(app, CHAT, json_body=body(CHAT, stream=stream), headers=headers)
    record = await one_record(ledger)
    assert record.status == "error"
    assert record.error
    if committed:
        assert ex.status == 200
        assert b"error" in ex.chunks[-1]  # told in-band
        assert await spent(ledger) == record.cost > 0  # charged what went out
    else:
        assert ex.status in (502, 504)
        assert await spent(ledger) == 0
    if mode != "refused":
        [sent] = misbehaving[0].requests  # the key went out stripped, and only there
        assert f"authorization: Bearer {UPSTREAM_KEY}\r\n".encode() in sent
    client_key = headers["authorization"].split()[1]
    secrets = (UPSTREAM_KEY, HEADER_SECRET, client_key)
    assert caplog.records or committed  # DEBUG is captured (a failed attempt is logged)
    for log in caplog.records:
        assert_no_secret(f"log record {log.getMessage()!r}", rendered(log), *secrets)
    assert_no_secret("the usage record", repr(record), *secrets)
    assert_no_secret("the response", ex.body.decode(errors="replace"), *secrets)


@pytest.mark.parametrize(("mode", "stream", "committed"), TRANSPORT_FAILURES, ids=FAILURE_IDS)
async def test_transport_failures_never_leak_the_key_into_platform_reports(
    any_client: Any,
    misbehaving: tuple[Misbehaving, str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    mode: str,
    stream: bool,
    committed: bool,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = failing_url(mode, misbehaving)
    plane = FakeControlPlane(gateway_token="gw-token-SECRET-777")
    plane.add_user("tok-alice", user_id="alice")
    attempt = {"provider": "openai", "base_url": f"{url}/v1", "api_key": KEY_AS_READ}
    plane.set_attempts("*", {**attempt, "headers": {"x-upstream-secret": HEADER_SECRET}})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plane.app)) as plane_http:
        platform = PlatformMode(
            base_url="http://plane.test",
            gateway_token="gw-token-SECRET-777",
            client=plane_http,
            outbox=SQLiteOutbox(str(tmp_path / "outbox.db")),
            retry=RetryPolicy(initial_delay=0.02, max_delay=0.05),
        )
        app = GatewayMiddleware(
            Starlette(routes=gateway_routes(client=any_client, read_timeout=0.3)), mode=platform
        )
        async with platform:
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            ex = await call(
                app,
                CHAT,
                json_body={**chat, "stream": stream},
                headers={"authorization": "Bearer tok-alice"},
            )
            assert ex.status in ((200,) if committed else (502, 504))
            platform.sender.notify()
            with anyio.fail_after(5):
                while not plane.reports:  # noqa: ASYNC110 - the fake exposes only a dict
                    await anyio.sleep(0.02)
    [report] = plane.reports.values()
    assert report["status"] == "error"
    assert report["error"]
    secrets = (UPSTREAM_KEY, HEADER_SECRET)
    assert_no_secret("the usage report", json.dumps(report), *secrets)
    for log in caplog.records:
        assert_no_secret(f"log record {log.getMessage()!r}", rendered(log), *secrets)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_a_key_read_with_its_newline_is_stripped_and_works_with_httpx(
    ledger: SQLiteLedger, provider: tuple[FakeProvider, str], path: str, stream: bool
) -> None:
    """The fake provider accepts only ``UPSTREAM_KEY``; the configured key is that plus the
    newline a key file ends with. httpx (h11) refuses a header value with a newline and
    quotes it whole in its error — the key must never get that far."""
    fake, url = provider
    async with httpx.AsyncClient() as http:
        app = app_for(ledger, http, both_providers(url, key=KEY_AS_READ))
        headers = await keyed(ledger)
        ex = await call(app, path, json_body=body(path, stream=stream), headers=headers)
    assert ex.status == 200
    [received] = fake.requests
    if path == CHAT:
        assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    else:
        assert received.headers["x-api-key"] == UPSTREAM_KEY
    assert (await one_record(ledger)).status == "success"


@pytest.mark.parametrize(
    "key",
    [
        "sk-proj-abcdef0123\n456789",
        "sk-proj-abcdef0123\r456789",
        "sk-proj-abcdef0123\x00456789",
        "sk-proj-abcdef0123\x7f456789",
        "sk-proj-abcdef0123\t\n456789",
        "sk-proj-abcdef0123\u00e9456789",
    ],
    ids=["lf", "cr", "nul", "del", "tab-lf", "non-ascii"],
)
def test_an_upstream_key_with_a_control_character_is_refused_without_quoting_it(
    key: str,
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Upstream("https://api.example.com/v1", api_key=key)
    error = refused.value
    text = f"{error} {error!r} {error.args!r} {error.__cause__!r} {error.__context__!r}"
    for part in ("abcdef0123", "456789"):
        assert part not in text
    with pytest.raises(ConfigurationError) as refused:
        Upstream("https://api.example.com/v1", headers={"x-secret": key})
    error = refused.value
    text = f"{error} {error!r} {error.args!r} {error.__cause__!r} {error.__context__!r}"
    for part in ("abcdef0123", "456789"):
        assert part not in text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_platform_an_answer_whose_report_cannot_be_stored_is_withheld(
    client: Any,
    provider: tuple[FakeProvider, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stream: bool,
) -> None:
    """PlatformMode's charge is its usage report: when the outbox cannot store it, the
    answer is withheld as in standalone mode (a 503, or an in-band error for a stream)."""
    fake, url = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=20)
    plane = FakeControlPlane(gateway_token="gw-token-SECRET-777")
    plane.add_user("tok-alice", user_id="alice")
    plane.set_attempts(
        "*", {"provider": "openai", "base_url": f"{url}/v1", "api_key": UPSTREAM_KEY}
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plane.app)) as plane_http:
        platform = PlatformMode(
            base_url="http://plane.test",
            gateway_token="gw-token-SECRET-777",
            client=plane_http,
            outbox=SQLiteOutbox(str(tmp_path / "outbox.db")),
            retry=RetryPolicy(initial_delay=0.02, max_delay=0.05),
        )
        app = GatewayMiddleware(Starlette(routes=gateway_routes(client=client)), mode=platform)

        async def disk_full(*args: Any, **kwargs: Any) -> Any:
            raise OSError("disk full")

        async with platform:
            monkeypatch.setattr(platform, "complete_admission", disk_full)
            monkeypatch.setattr(platform, "enqueue_report", disk_full)
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            ex = await call(
                app,
                CHAT,
                json_body={**chat, "stream": stream},
                headers={"authorization": "Bearer tok-alice"},
            )
            monkeypatch.undo()
    assert len(fake.requests) == 1
    if stream:
        assert ex.status == 200
        assert b"could not record" in ex.chunks[-1]
    else:
        assert ex.status == 503
        error = openai_error(ex)
        assert (error["type"], "could not record" in error["message"]) == ("api_error", True)
        assert b"tok0" not in ex.body
    # The admission stayed open: the stopping mode reported the request incomplete, once.
    [report] = plane.reports.values()
    assert report["status"] == "incomplete"
    assert plane.report_problems() == []
