"""Each adapter against the fake provider on a real socket, through the aiohttp-backed
default client; the gateway side is driven by the raw ASGI driver."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.testing import FakeProvider
from gatewaykit.usage import UsageSource
from tests.adapters.conftest import (
    BEHAVIOR,
    CHAT,
    MESSAGES,
    PRICE,
    RESPONSES,
    Format,
    Shim,
    behavior_header,
)
from tests.asgi import Exchange, call

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[AiohttpClient]:
    async with default_client() as http:
        yield http


def shim_for(fmt: Format, client: AiohttpClient, upstreams: list[Any], **options: Any) -> Shim:
    routes = {route.path: route.endpoint for route in gateway_routes(client=client, **options)}
    return Shim(routes[fmt.path], fmt, upstreams)


def upstream(fmt: Format, url: str, **behavior: Any) -> Any:
    headers = behavior_header(**behavior) if behavior else {}
    return fmt.upstream(url, api_key="sk-upstream", headers=headers)


async def test_stream_success_forwards_events_and_settles_before_the_final_event(
    fmt: Format, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    fake, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url, delay=0.01)])
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
    assert ex.status == 200
    assert ex.headers["content-type"].startswith("text/event-stream")
    body = ex.body
    for index in range(BEHAVIOR.events):
        assert BEHAVIOR.piece(index).encode() in body
    assert fmt.final_marker() in ex.chunks[-1]
    assert len(ex.chunks) >= 4  # read by read, not one buffered blob
    settlement = shim.settlement
    call_ = settlement.call
    assert call_.status == "success"
    assert call_.usage == fmt.expected()
    assert call_.usage is not None
    assert call_.usage.source is UsageSource.PROVIDER
    # Settled while the final message was still unsent.
    assert call_.sent == len(ex.sent) - 1
    assert settlement.first_chunk_calls == 1
    assert settlement.committed
    assert settlement.outcome is not None
    assert settlement.outcome.charged == PRICE.cost(fmt.expected())
    assert settlement.output_chars == len(BEHAVIOR.output_text)
    # The gateway's own credential went upstream, never the client's.
    seen = fake.requests[-1]
    assert seen.body["model"] == "test-model"
    if fmt.provider == "openai":
        assert seen.headers["authorization"] == "Bearer sk-upstream"
    else:
        assert seen.headers["x-api-key"] == "sk-upstream"
        assert seen.headers["anthropic-version"] == "2023-06-01"


async def test_chat_usage_chunk_hidden_unless_the_client_asked(
    provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    fake, url = provider
    shim = shim_for(CHAT, client, [upstream(CHAT, url)])
    hidden = await call(shim, CHAT.path, json_body=CHAT.body(stream=True))
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True}
    assert b'"prompt_tokens"' not in hidden.body
    assert hidden.body.endswith(b"data: [DONE]\n\n")

    shim = shim_for(CHAT, client, [upstream(CHAT, url)])
    options = {"include_usage": True, "continuous_usage_stats": False}
    shown = await call(shim, CHAT.path, json_body=CHAT.body(stream=True, stream_options=options))
    assert fake.requests[-1].body["stream_options"] == options
    assert b'"prompt_tokens":23' in shown.body
    assert shim.settlement.call.usage == CHAT.expected()


async def test_chat_explicit_include_usage_false_is_still_billed(
    provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    fake, url = provider
    shim = shim_for(CHAT, client, [upstream(CHAT, url)])
    body = CHAT.body(stream=True, stream_options={"include_usage": False, "x": 1})
    ex = await call(shim, CHAT.path, json_body=body)
    assert fake.requests[-1].body["stream_options"] == {"include_usage": True, "x": 1}
    assert b'"prompt_tokens"' not in ex.body
    assert shim.settlement.call.usage == CHAT.expected()


async def test_nonstream_success_passes_the_body_through(
    fmt: Format, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url)])
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=False))
    assert ex.status == 200
    assert ex.headers["content-length"] == str(len(ex.body))
    payload = ex.json()
    assert BEHAVIOR.output_text in json.dumps(payload)
    call_ = shim.settlement.call
    assert call_.status == "success"
    assert call_.usage == fmt.expected()
    # Nothing went out before the charge was recorded: the body is the answer.
    assert call_.sent == 0
    assert [m.get("more_body", False) for m in ex.sent[1:]] == [False]
    assert shim.settlement.output_chars == len(BEHAVIOR.output_text)


async def test_nonstream_disconnect_after_the_body_charges_its_usage(
    fmt: Format, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url)])
    exchange = Exchange()
    # The client leaves while the settlement runs, i.e. after the body, before the end.
    shim.on_settle = exchange.disconnect
    await call(shim, fmt.path, json_body=fmt.body(stream=False), exchange=exchange)
    call_ = shim.settlement.call
    assert call_.status == "success"
    assert call_.usage == fmt.expected()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_missing_usage_calls_on_no_usage(
    fmt: Format, stream: bool, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url, omit_usage=True)])
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=stream))
    assert ex.status == 200
    call_ = shim.settlement.call
    assert call_.status == "no_usage"
    assert call_.usage is None
    assert shim.settlement.output_chars == len(BEHAVIOR.output_text)
    if stream:
        assert fmt.final_marker() in ex.chunks[-1]
        assert call_.sent == len(ex.sent) - 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize(
    ("upstream_status", "client_status"),
    [(400, 400), (429, 429), (529, 529), (401, 502), (403, 502)],
)
async def test_failure_before_first_chunk(
    fmt: Format,
    stream: bool,
    upstream_status: int,
    client_status: int,
    provider: tuple[FakeProvider, str],
    client: AiohttpClient,
) -> None:
    _, url = provider
    behavior = {"fail_status": upstream_status, "retry_after": "7"}
    shim = shim_for(fmt, client, [upstream(fmt, url, **behavior)])
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=stream))
    assert ex.status == client_status
    payload = ex.json()
    if upstream_status in (401, 403):
        # The gateway's own credential failed: a 502 api_error, the upstream body hidden.
        if fmt.wire.is_openai:
            assert payload["error"]["type"] == "api_error"
        else:
            assert payload == {"type": "error", "error": payload["error"]}
            assert payload["error"]["type"] == "api_error"
        assert "retry-after" not in ex.headers
    else:
        assert payload["error"]["message"] == "fake provider failure"  # passed through
        assert ex.headers["retry-after"] == "7"
    call_ = shim.settlement.call
    assert call_.status == "error"
    assert not shim.settlement.committed
    assert shim.settlement.outcome is not None
    assert shim.settlement.outcome.refunded
    assert shim.settlement.first_chunk_calls == 0


async def test_fallback_to_the_next_attempt_before_the_first_chunk(
    fmt: Format, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    fake, url = provider
    failing = upstream(fmt, url, fail_status=503)
    shim = shim_for(fmt, client, [failing, upstream(fmt, url)])
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
    assert ex.status == 200
    assert shim.settlement.call.usage == fmt.expected()
    assert len(fake.requests) == 2
    # The settlement learned which attempt served (PlatformMode reports on it).
    assert shim.settlement.attempt is not None
    assert shim.settlement.attempt.attempt_id == "att-1"


async def test_no_fallback_for_a_client_error(
    provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    fake, url = provider
    shim = shim_for(CHAT, client, [upstream(CHAT, url, fail_status=400), upstream(CHAT, url)])
    ex = await call(shim, CHAT.path, json_body=CHAT.body(stream=True))
    assert ex.status == 400
    assert len(fake.requests) == 1


async def test_connect_error_is_502(fmt: Format, client: AiohttpClient) -> None:
    shim = shim_for(fmt, client, [fmt.upstream("http://127.0.0.1:9")])
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
    assert ex.status == 502
    payload = ex.json()
    assert payload["error"]["type"] == "api_error"
    assert shim.settlement.call.status == "error"
    assert shim.settlement.outcome is not None
    assert shim.settlement.outcome.refunded


@pytest.mark.parametrize("which", ["read", "first_chunk"])
async def test_timeout_before_first_chunk_is_504(
    fmt: Format, which: str, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    if which == "read":
        shim = shim_for(fmt, client, [upstream(fmt, url, first_byte_delay=2)], read_timeout=0.2)
    else:
        shim = shim_for(
            fmt, client, [upstream(fmt, url, first_event_delay=2)], first_chunk_timeout=0.2
        )
    started = time.monotonic()
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
    assert time.monotonic() - started < 1.5
    assert ex.status == 504
    assert ex.json()["error"]["type"] == "api_error"
    assert shim.settlement.call.status == "error"
    assert not shim.settlement.committed


async def test_read_timeout_mid_stream_is_an_in_band_error(
    fmt: Format, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url, delay=2, events=3)], read_timeout=0.3)
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
    assert ex.status == 200
    assert b"upstream_timeout" in ex.chunks[-1] or b"timed out" in ex.chunks[-1]
    assert shim.settlement.call.status == "error"
    assert shim.settlement.committed


@pytest.mark.parametrize("mode", ["drop", "error"])
async def test_failure_mid_stream(
    fmt: Format, mode: str, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url, fail_after=2, fail_mode=mode)])
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
    assert ex.status == 200
    assert ex.complete
    last = ex.chunks[-1]
    if fmt is CHAT:
        assert b'"error"' in last
    else:
        assert last.startswith(b"event: error")
    if fmt is CHAT and mode == "drop":
        assert last.endswith(b"data: [DONE]\n\n")
    settlement = shim.settlement
    call_ = settlement.call
    assert call_.status == "error"
    assert settlement.committed
    assert call_.sent == len(ex.sent) - 1
    assert settlement.output_chars == len(BEHAVIOR.piece(0) + BEHAVIOR.piece(1))
    if fmt is MESSAGES:
        # message_start reported the prompt: the partial usage is charged.
        assert call_.usage is not None
        assert call_.usage.source is UsageSource.PARTIAL
        assert call_.usage.input_tokens == BEHAVIOR.input_tokens
        assert call_.usage.cache_write_tokens == BEHAVIOR.cache_write_tokens
    else:
        assert call_.usage is None


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("kind", ["json", "sse"])
async def test_malformed_upstream(
    fmt: Format,
    stream: bool,
    kind: str,
    provider: tuple[FakeProvider, str],
    client: AiohttpClient,
) -> None:
    _, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url, malformed=kind, delay=0.01)])
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=stream))
    assert ex.complete
    call_ = shim.settlement.call
    if fmt is CHAT and stream and kind == "json":
        # After its first event a chat stream is not parsed, only scanned for text: the
        # garbled chunk reaches the client as sent, and the usage that follows is charged.
        assert call_.status == "success"
        assert call_.usage == fmt.expected()
        return
    assert call_.status == "error"
    assert "malformed" in (call_.error or "") or "final event" in (call_.error or "")
    if stream and ex.status == 200:
        # The first event was fine, so the response had started: the error is in-band.
        assert b"upstream_unreachable" in ex.chunks[-1] or b"api_error" in ex.chunks[-1]
        assert shim.settlement.committed
    else:
        # (A stream whose first read already held the bad bytes never started.)
        assert ex.status == 502
        assert ex.json()["error"]["type"] == "api_error"
        assert shim.settlement.outcome is not None
        assert shim.settlement.outcome.refunded


# -- client disconnects ----------------------------------------------------------------------


async def _wait_for(predicate: Any, limit: float = 2.0) -> None:
    with anyio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - polling state owned by a server
            await anyio.sleep(0.01)


async def test_disconnect_before_first_chunk_is_noticed_while_upstream_is_silent(
    fmt: Format, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    fake, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url, first_event_delay=5)])
    exchange = Exchange()
    started = time.monotonic()
    async with anyio.create_task_group() as group:
        group.start_soon(
            lambda: call(shim, fmt.path, json_body=fmt.body(stream=True), exchange=exchange)
        )
        await _wait_for(lambda: len(fake.requests) == 1)
        await anyio.sleep(0.1)
        exchange.disconnect()
    assert time.monotonic() - started < 1.5
    assert exchange.sent == []
    call_ = shim.settlement.call
    assert call_.status == "incomplete"
    assert call_.usage is None
    assert shim.settlement.upstream_contacted
    assert not shim.settlement.committed
    await _wait_for(lambda: fake.disconnects == 1)  # the upstream stream was closed


async def test_disconnect_mid_stream(
    fmt: Format, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    fake, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url, delay=0.1, events=4)])
    started = time.monotonic()

    def after_first_piece(sent: list[Any]) -> bool:
        return any(BEHAVIOR.piece(0).encode() in m.get("body", b"") for m in sent)

    ex = await call(shim, fmt.path, json_body=fmt.body(stream=True), disconnect=after_first_piece)
    assert time.monotonic() - started < 1.5
    assert not ex.complete
    settlement = shim.settlement
    call_ = settlement.call
    assert call_.status == "incomplete"
    assert settlement.committed
    assert settlement.output_chars == len(BEHAVIOR.piece(0))
    if fmt is MESSAGES:
        assert call_.usage is not None
        assert call_.usage.input_tokens == BEHAVIOR.input_tokens
    else:
        assert call_.usage is None
    await _wait_for(lambda: fake.disconnects == 1)


async def test_disconnect_at_the_last_event_cannot_skip_settlement(
    fmt: Format, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    shim = shim_for(fmt, client, [upstream(fmt, url)])
    exchange = Exchange()
    # The client leaves the moment settlement starts, i.e. while the final event waits.
    shim.on_settle = exchange.disconnect
    await call(shim, fmt.path, json_body=fmt.body(stream=True), exchange=exchange)
    call_ = shim.settlement.call
    assert call_.status == "success"
    assert call_.usage == fmt.expected()


async def test_disconnect_after_usage_but_before_the_final_event_charges_the_usage(
    provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    shim = shim_for(MESSAGES, client, [upstream(MESSAGES, url, delay=0.1, events=1)])

    def after_delta(sent: list[Any]) -> bool:
        return any(b"message_delta" in m.get("body", b"") for m in sent)

    ex = await call(
        shim, MESSAGES.path, json_body=MESSAGES.body(stream=True), disconnect=after_delta
    )
    assert b"message_stop" not in ex.body
    call_ = shim.settlement.call
    assert call_.status == "incomplete"
    assert call_.usage == MESSAGES.expected(dataclasses.replace(BEHAVIOR, events=1))


async def test_gateway_routes_and_their_methods(client: AiohttpClient) -> None:
    routes = gateway_routes(client=client, prefix="/api/")
    assert [(r.path, sorted(r.methods or ["*"])) for r in routes] == [
        ("/api/chat/completions", ["POST"]),
        ("/api/messages", ["POST"]),
        ("/api/responses", ["POST"]),
        ("/api/embeddings", ["POST"]),
        ("/api/messages/count_tokens", ["POST"]),
        ("/api/models", ["GET", "HEAD"]),
        ("/api/models/{model_id:path}", ["GET", "HEAD"]),
        ("/api/{path:path}", ["*"]),  # the catch-all: a 404 in the provider's envelope
    ]
    assert [r.path for r in gateway_routes(client=client, catch_all=False)][-1] == (
        "/v1/models/{model_id:path}"
    )


async def test_responses_and_chat_share_an_openai_upstream(
    provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    fake, url = provider
    for fmt in (CHAT, RESPONSES):
        shim = shim_for(fmt, client, [upstream(fmt, url)])
        ex = await call(shim, fmt.path, json_body=fmt.body(stream=False))
        assert ex.status == 200
    assert [r.path for r in fake.requests] == ["/v1/chat/completions", "/v1/responses"]


async def test_no_matching_upstream_is_404(client: AiohttpClient) -> None:
    shim = shim_for(MESSAGES, client, [CHAT.upstream("http://127.0.0.1:9")])
    ex = await call(shim, MESSAGES.path, json_body=MESSAGES.body(stream=True))
    assert ex.status == 404
    assert ex.json()["error"]["type"] == "not_found_error"
    assert shim.settlement.call.status == "error"
