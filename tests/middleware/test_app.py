"""GatewayMiddleware inside a FastAPI app: everything it does not gate behaves as without it,
and a custom handler can settle any stream with get_settlement + settle_stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import anyio
import pytest
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import StreamingResponse
from starlette.types import ASGIApp, Message

from gatewaykit import GatewayMiddleware, get_settlement, settle_stream
from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError, ErrorKind, RequestRejected, SettlementMissingError
from gatewaykit.ledger.base import HoldState, Ledger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.parsing import ParsedRequest
from gatewaykit.settlement import Settlement
from gatewaykit.streams import UsageExtractor
from gatewaykit.usage import Usage, UsageSource
from tests.asgi import call, http_scope
from tests.middleware.conftest import MakeKey, bearer, chat, messages

pytestmark = pytest.mark.anyio
MICRO = Decimal("0.000001")


class LineExtractor:
    """Usage from a toy JSON-lines stream: {"text": ...} lines, then {"usage": {...}}."""

    def __init__(self) -> None:
        self.partial: Usage | None = None
        self.output_chars = 0
        self._final: Usage | None = None
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            event = json.loads(line)
            if "text" in event:
                self.output_chars += len(event["text"])
            if "prompt" in event:
                self.partial = Usage(input_tokens=event["prompt"], source=UsageSource.PARTIAL)
            if "usage" in event:
                self._final = Usage(event["usage"]["in"], event["usage"]["out"])

    def result(self) -> Usage | None:
        return self._final


def build_app(state: dict[str, Any]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["started"] = True
        yield
        state["stopped"] = True

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/echo")
    async def echo(request: Request) -> Any:
        return await request.json()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk {i}\n".encode()

        return StreamingResponse(body(), media_type="text/plain")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(text.upper())
        await websocket.close()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> StreamingResponse:
        settlement = get_settlement(request)
        state["settlement"] = settlement
        lines: list[bytes] = state.get("lines", [])

        async def upstream() -> AsyncIterator[bytes]:
            for line in lines:
                if line == b"FAIL":
                    raise RuntimeError("upstream broke")
                if line == b"HANG":
                    await anyio.sleep_forever()
                yield line

        chunks = settle_stream(upstream(), settlement, LineExtractor())
        return StreamingResponse(chunks, media_type="application/x-ndjson")

    return app


@pytest.fixture
def state() -> dict[str, Any]:
    return {}


@pytest.fixture
def plain(state: dict[str, Any]) -> FastAPI:
    return build_app(state)


@pytest.fixture
def wrapped(
    state: dict[str, Any], make_mode: Callable[..., StandaloneMode]
) -> Callable[..., ASGIApp]:
    def make(**options: Any) -> ASGIApp:
        app = build_app(state)
        app.add_middleware(GatewayMiddleware, mode=make_mode(), **options)
        return app

    return make


def _stable(sent: list[Message]) -> list[Message]:
    """Messages minus the date header, which changes between runs."""
    out = []
    for message in sent:
        if message["type"] == "http.response.start":
            headers = [(k, v) for k, v in message["headers"] if k != b"date"]
            message = {**message, "headers": headers}
        out.append(message)
    return out


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/healthz", None),
        ("POST", "/echo", {"model": "gpt-test", "messages": []}),
        ("GET", "/stream", None),
        ("GET", "/v1/chat/completions", None),  # gated path, other method: 405 as before
        ("POST", "/missing", None),
    ],
)
async def test_ungated_routes_behave_exactly_as_without_it(
    plain: FastAPI,
    wrapped: Callable[..., ASGIApp],
    method: str,
    path: str,
    body: Any,
) -> None:
    without = await call(plain, path, method=method, json_body=body)
    with_it = await call(wrapped(), path, method=method, json_body=body)
    assert _stable(with_it.sent) == _stable(without.sent)
    assert len([m for m in with_it.sent if m["type"] == "http.response.body"]) >= 1


async def _websocket(app: ASGIApp) -> list[Message]:
    script: list[Message] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "hello"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return script.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {**http_scope("/ws", method="GET"), "type": "websocket", "scheme": "ws"}
    scope.pop("method")
    scope["subprotocols"] = []
    await app(scope, receive, send)
    return sent


async def test_websocket_behaves_exactly_as_without_it(
    plain: FastAPI, wrapped: Callable[..., ASGIApp]
) -> None:
    expected = await _websocket(plain)
    assert [m["type"] for m in expected] == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ]
    assert await _websocket(wrapped()) == expected


async def test_lifespan_passes_through(
    state: dict[str, Any], wrapped: Callable[..., ASGIApp]
) -> None:
    script: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return script.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await wrapped()({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert state == {"started": True, "stopped": True}


async def test_get_settlement_without_the_middleware_names_it(plain: FastAPI) -> None:
    with pytest.raises(SettlementMissingError, match="GatewayMiddleware"):
        await call(plain, json_body=chat())


async def test_custom_handler_settles_with_settle_stream_before_the_final_message(
    ledger: Ledger, state: dict[str, Any], wrapped: Callable[..., ASGIApp], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    state["lines"] = [
        b'{"text": "hello"}\n',
        b'{"text": " world"}\n{"usage"',
        b': {"in": 7, "out": 3}}\n',
    ]
    settled_at_final: list[bool] = []

    def watch(sent: list[Message]) -> bool:
        last = sent[-1]
        if last["type"] == "http.response.body" and not last.get("more_body", False):
            settlement: Settlement = state["settlement"]
            settled_at_final.append(settlement.done)
        return False

    ex = await call(wrapped(), json_body=chat(max_tokens=10), headers=bearer(key), disconnect=watch)
    assert ex.status == 200
    assert ex.body == b"".join(state["lines"])
    assert settled_at_final == [True]
    settlement: Settlement = state["settlement"]
    assert settlement.outcome is not None
    assert settlement.outcome.status == "success"
    assert settlement.outcome.charged == (7 + 2 * 3) * MICRO
    assert settlement.output_chars == len("hello world")
    assert await ledger.holds() == []


async def test_settle_stream_without_usage_uses_the_missing_usage_policy(
    ledger: Ledger, state: dict[str, Any], wrapped: Callable[..., ASGIApp], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    state["lines"] = [b'{"text": "abcdefgh"}\n']
    await call(wrapped(), json_body=chat(max_tokens=10), headers=bearer(key))
    outcome = state["settlement"].outcome
    assert outcome.status == "no_usage"
    assert outcome.charged == (1 + 2 * 2) * MICRO  # prompt estimate + ceil(8/4) out


async def test_settle_stream_error_mid_stream_charges_observed(
    ledger: Ledger, state: dict[str, Any], wrapped: Callable[..., ASGIApp], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    state["lines"] = [b'{"prompt": 40}\n', b'{"text": "abcd"}\n', b"FAIL"]
    with pytest.raises(RuntimeError, match="upstream broke"):
        await call(wrapped(), json_body=chat(max_tokens=10), headers=bearer(key))
    outcome = state["settlement"].outcome
    assert outcome.status == "error"
    assert outcome.charged == (40 + 2 * 1) * MICRO
    assert await ledger.holds() == []


async def test_settle_stream_error_before_the_first_chunk_refunds(
    ledger: Ledger, state: dict[str, Any], wrapped: Callable[..., ASGIApp], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    state["lines"] = [b"FAIL"]
    with pytest.raises(RuntimeError):
        await call(wrapped(), json_body=chat(max_tokens=10), headers=bearer(key))
    outcome = state["settlement"].outcome
    assert (outcome.status, outcome.charged, outcome.refunded) == ("error", 0, True)
    (hold,) = await ledger.holds(live_only=False)
    assert hold.state is HoldState.RELEASED


async def test_abandoned_settle_stream_is_settled_incomplete_by_the_middleware(
    ledger: Ledger, state: dict[str, Any], wrapped: Callable[..., ASGIApp], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    state["lines"] = [b'{"prompt": 40}\n{"text": "abcdefgh"}\n', b"HANG"]
    ex = await call(
        wrapped(),
        json_body=chat(max_tokens=10),
        headers=bearer(key),
        disconnect=lambda sent: any(m.get("body") for m in sent),
    )
    assert not ex.complete
    outcome = state["settlement"].outcome
    assert outcome.status == "incomplete"
    assert outcome.charged == (40 + 2 * 2) * MICRO
    assert outcome.usage.source is UsageSource.PARTIAL
    assert await ledger.holds() == []


async def test_body_size_cap_is_413_in_the_route_envelope(
    ledger: Ledger, wrapped: Callable[..., ASGIApp], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    app = wrapped(max_body_bytes=200)
    big = chat("x" * 300)
    declared = await call(app, json_body=big, headers=bearer(key))
    assert declared.status == 413
    assert declared.json()["error"]["code"] == "request_too_large"
    raw = json.dumps(messages("y" * 300)).encode()
    streamed = await call(app, "/v1/messages", body=[raw[:150], raw[150:]], headers=bearer(key))
    assert streamed.status == 413
    assert streamed.json()["type"] == "error"
    assert streamed.json()["error"]["type"] == "request_too_large"
    assert streamed.receive_calls == 2
    # a bad credential outranks the size
    unauthenticated = await call(app, json_body=big, headers=bearer("nope"))
    assert unauthenticated.status == 401
    assert await ledger.holds(live_only=False) == []


async def test_content_length_is_checked_before_reading(
    wrapped: Callable[..., ASGIApp], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    ex = await call(
        wrapped(max_body_bytes=10),
        body=b"{}",
        headers={**bearer(key), "content-length": "11"},
    )
    assert ex.status == 413
    assert ex.receive_calls == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (b'{"messages": []}', "model"),
        (b'{"model": "gpt-test", "messages": [], "stream": "yes"}', "stream"),
        (b'{"model": "gpt-test", "messages": [], "max_tokens": -1}', "max_tokens"),
        (b'{"model": "gpt-test", "messages": "hi"}', "messages"),
        (b'{"model": "gpt-test", "messages": [], "user": 7}', "user"),
    ],
)
async def test_unusable_bodies_are_400(
    wrapped: Callable[..., ASGIApp], make_key: MakeKey, body: bytes, message: str
) -> None:
    key, _ = await make_key("alice")
    ex = await call(wrapped(), body=body, headers=bearer(key))
    assert ex.status == 400
    error = ex.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


async def test_a_thinking_budget_below_anthropics_minimum_is_400_before_any_hold(
    ledger: Ledger, wrapped: Callable[..., ASGIApp], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    body = messages(thinking={"type": "enabled", "budget_tokens": 512})
    ex = await call(wrapped(), "/v1/messages", json_body=body, headers=bearer(key))
    assert ex.status == 400
    assert ex.json()["type"] == "error"
    assert ex.json()["error"]["type"] == "invalid_request_error"
    assert "budget_tokens" in ex.json()["error"]["message"]
    assert await ledger.holds(live_only=False) == []


async def test_custom_estimator_route(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    seen: list[Settlement] = []

    def estimate(body: Any) -> ParsedRequest:
        if "prompt" not in body:
            raise ValueError("'prompt' is required")
        if body["prompt"] == "forbidden":
            raise RequestRejected(ErrorKind.PERMISSION, "not that")
        return ParsedRequest(
            model="gpt-test", prompt_chars=len(body["prompt"]), max_output_tokens=1
        )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        settlement = get_settlement(scope)
        seen.append(settlement)
        await settlement.on_success(Usage(1, 0))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gated = GatewayMiddleware(app, mode=make_mode(), routes={"/complete": estimate})
    ok = await call(gated, "/complete", json_body={"prompt": "x" * 8}, headers=bearer(key))
    assert ok.status == 200
    assert seen[0].estimate.prompt_tokens == 2
    missing = await call(gated, "/complete", json_body={}, headers=bearer(key))
    assert missing.status == 400
    assert missing.json()["error"]["message"] == "'prompt' is required"
    refused = await call(gated, "/complete", json_body={"prompt": "forbidden"}, headers=bearer(key))
    assert refused.status == 403
    # the default routes are not gated when routes are given
    with pytest.raises(SettlementMissingError):
        await call(gated, json_body=chat(), headers=bearer(key))
    assert len(seen) == 1


async def test_mounted_under_a_root_path(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await get_settlement(scope).on_success(Usage(1, 0))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gated = GatewayMiddleware(app, mode=make_mode())
    scope_path = "/gateway/v1/chat/completions"
    sent: list[Message] = []
    body = json.dumps(chat()).encode()
    messages_in: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if messages_in:
            return messages_in.pop(0)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {**http_scope(scope_path, headers=bearer(key)), "root_path": "/gateway"}
    await gated(scope, receive, send)
    assert sent[0]["status"] == 200
    assert await ledger.holds() == []


async def test_middleware_configuration_is_validated(
    make_mode: Callable[..., StandaloneMode],
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None: ...  # pragma: no cover

    mode = make_mode()
    cases: list[dict[str, Any]] = [
        {"mode": object()},
        {"mode": mode, "routes": {"v1/x": "openai_chat"}},
        {"mode": mode, "routes": {"/x": 3}},
        {"mode": mode, "routes": {"/x": "openai_chatt"}},
        {"mode": mode, "max_body_bytes": 0},
        {"mode": mode, "max_body_bytes": True},
        {"mode": mode, "heartbeat_interval": 0},
        {"mode": mode, "request_id_header": ""},
    ]
    for bad in cases:
        with pytest.raises(ConfigurationError):
            GatewayMiddleware(app, **bad)
    by_name = GatewayMiddleware(app, mode=mode, routes={"/x": "anthropic_messages"})  # type: ignore[dict-item]
    assert by_name.routes == {"/x": WireFormat.ANTHROPIC_MESSAGES}


def test_usage_extractor_protocol() -> None:
    assert isinstance(LineExtractor(), UsageExtractor)


async def test_outer_middleware_sees_what_the_app_wrote_into_the_scope(
    wrapped: Callable[..., ASGIApp], make_key: MakeKey, state: dict[str, Any]
) -> None:
    key, _ = await make_key("alice")
    state["lines"] = [b'{"usage": {"in": 1, "out": 1}}\n']
    inner = wrapped()
    seen: dict[str, Any] = {}

    async def outer(scope: Any, receive: Any, send: Any) -> None:
        await inner(scope, receive, send)
        seen.update(scope)

    await call(outer, json_body=chat(), headers=bearer(key))
    assert seen["gatewaykit"].settlement is state["settlement"]
    assert seen["route"].path == "/v1/chat/completions"  # recorded by the router


async def test_a_mode_without_authenticate_gets_the_body_error_first() -> None:
    resolved: list[str] = []

    class ResolveOnly:
        async def resolve(self, request: Any) -> Any:  # pragma: no cover - never reached
            resolved.append(request.request_id)
            raise AssertionError

    async def app(scope: Any, receive: Any, send: Any) -> None: ...  # pragma: no cover

    gated = GatewayMiddleware(app, mode=ResolveOnly())
    ex = await call(gated, "/v1/messages", body=b"{oops")
    assert ex.status == 400
    assert ex.json()["error"]["type"] == "invalid_request_error"
    assert resolved == []
