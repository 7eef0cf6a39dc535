"""Fixtures for the adapter tests: a recording settlement, a shim standing in for
GatewayMiddleware, per-format descriptions, and real uvicorn servers."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping
from decimal import Decimal
from typing import Any

import anyio
import pytest
import uvicorn

from gatewaykit.context import SCOPE_KEY, GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.pricing import ModelPrice
from gatewaykit.settlement import (
    RequestEstimate,
    Settlement,
    SettlementOutcome,
    SettlementStatus,
)
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage

#: $1 in, $2 out, $0.10 cache read, $1.25 cache write per million tokens.
PRICE = ModelPrice(Decimal(1), Decimal(2), Decimal("0.1"), Decimal("1.25"))
ESTIMATE = RequestEstimate(prompt_tokens=10, max_output_tokens=100, amount=Decimal("0.00021"))
BEHAVIOR = FakeBehavior(events=5, input_tokens=20, cache_read_tokens=3, cache_write_tokens=2)


@dataclasses.dataclass(frozen=True)
class Call:
    status: SettlementStatus
    usage: Usage | None
    error: str | None
    sent: int  # messages the client had been sent when the settlement finished


class RecordingSettlement(Settlement):
    """Records its terminal hook; charges ``PRICE.cost(usage)`` for usage it was given."""

    def __init__(self, probe: Callable[[], int] = lambda: -1) -> None:
        super().__init__(request_id="req-1", estimate=ESTIMATE)
        self.calls: list[Call] = []
        self.probe = probe
        self.first_chunk_calls = 0

    async def on_first_chunk(self) -> None:
        self.first_chunk_calls += 1
        await super().on_first_chunk()

    async def _finish(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        self.calls.append(Call(status, usage, error, self.probe()))
        charged = PRICE.cost(usage) if usage is not None else Decimal(0)
        refunded = status == "error" and not self.committed
        return SettlementOutcome(
            status, Decimal(0) if refunded else charged, usage, refunded, error
        )

    @property
    def call(self) -> Call:
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


@dataclasses.dataclass(frozen=True)
class Format:
    """One wire format as the tests need it."""

    name: str
    wire: WireFormat
    path: str
    provider: str

    def upstream(self, base: str, **options: Any) -> Upstream:
        if self.provider == "openai":
            return Upstream(f"{base}/v1", provider="openai", **options)
        return Upstream(base, provider="anthropic", **options)

    def body(self, *, stream: bool, model: str = "test-model", **extra: Any) -> dict[str, Any]:
        if self.wire is WireFormat.OPENAI_RESPONSES:
            body: dict[str, Any] = {"model": model, "input": "hello there"}
        else:
            body = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
        if self.wire is WireFormat.ANTHROPIC_MESSAGES:
            body["max_tokens"] = 100
        if stream:
            body["stream"] = True
        body.update(extra)
        return body

    def expected(self, behavior: FakeBehavior = BEHAVIOR) -> Usage:
        return behavior.expected_usage(self.wire.value)

    def final_marker(self) -> bytes:
        return {
            WireFormat.OPENAI_CHAT: b"data: [DONE]",
            WireFormat.ANTHROPIC_MESSAGES: b"event: message_stop",
            WireFormat.OPENAI_RESPONSES: b"event: response.completed",
        }[self.wire]


CHAT = Format("chat", WireFormat.OPENAI_CHAT, "/v1/chat/completions", "openai")
MESSAGES = Format("messages", WireFormat.ANTHROPIC_MESSAGES, "/v1/messages", "anthropic")
RESPONSES = Format("responses", WireFormat.OPENAI_RESPONSES, "/v1/responses", "openai")
FORMATS = [CHAT, MESSAGES, RESPONSES]


@pytest.fixture(params=FORMATS, ids=lambda f: f.name)
def fmt(request: pytest.FixtureRequest) -> Format:
    return request.param  # type: ignore[no-any-return]


_ASGIApp = Callable[..., Any]


class Shim:
    """Stands in for GatewayMiddleware: parses the body, builds a context with a
    RecordingSettlement and the configured attempts, calls the adapter endpoint, and
    cancels it when the client disconnects before the response is complete.

    ``sent`` counts messages sent to the client, so a settlement can record how many
    had gone out when it finished.
    """

    def __init__(
        self, endpoint: _ASGIApp, fmt: Format, attempts: list[Upstream | Attempt] | None = None
    ) -> None:
        self.endpoint = endpoint
        self.fmt = fmt
        self.upstreams = attempts or []
        self.settlements: list[RecordingSettlement] = []
        self.contexts: list[GatewayContext] = []
        self.response_headers: dict[str, str] = {}
        self.sent = 0
        self.on_settle: Callable[[], None] | None = None

    def _probe(self) -> int:
        if self.on_settle is not None:
            self.on_settle()
        return self.sent

    @property
    def settlement(self) -> RecordingSettlement:
        assert len(self.settlements) == 1, self.settlements
        return self.settlements[0]

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        settlement = RecordingSettlement(self._probe)
        self.settlements.append(settlement)
        attempts = tuple(
            u if isinstance(u, Attempt) else Attempt(f"att-{i}", u, body["model"])
            for i, u in enumerate(self.upstreams)
        )
        scope[SCOPE_KEY] = context = GatewayContext(
            request_id=f"req-{len(self.settlements)}",
            settlement=settlement,
            format=self.fmt.wire,
            model=body["model"],
            stream=bool(body.get("stream")),
            body=body,
            attempts=attempts,
            response_headers=dict(self.response_headers),
        )

        self.contexts.append(context)
        # Like GatewayMiddleware: watch for the client leaving and cancel the endpoint
        # while its response is incomplete; the endpoint's own receive() then answers
        # http.disconnect; settle on_incomplete() if the endpoint did not.
        gone = anyio.Event()
        endpoint_scope = anyio.CancelScope()
        complete = False

        async def watch() -> None:
            while True:
                try:
                    message = await receive()
                except Exception:
                    break
                if message["type"] == "http.disconnect":
                    break
            gone.set()
            if not complete:
                endpoint_scope.cancel()

        async def endpoint_receive() -> MutableMapping[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def counting_send(message: MutableMapping[str, Any]) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            self.sent += 1
            await send(message)

        async with anyio.create_task_group() as group:
            group.start_soon(watch)
            with endpoint_scope:
                await self.endpoint(scope, endpoint_receive, counting_send)
            group.cancel_scope.cancel()
        if endpoint_scope.cancelled_caught and not settlement.done:
            await settlement.on_incomplete()


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in this event loop on a free port; yields its base URL."""

    class Server(uvicorn.Server):
        def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
            return contextlib.nullcontext()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # timeout_keep_alive above the gateway client's keep-alive (30 s), as real providers'
    # idle timeouts are: with uvicorn's 5 s, a loaded machine reuses connections the
    # server is closing (ServerDisconnectedError), which a POST may not be retried on.
    config = uvicorn.Config(
        app, lifespan="off", log_level="critical", access_log=False, timeout_keep_alive=75
    )
    config.timeout_graceful_shutdown = 1
    server = Server(config)
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: server.serve(sockets=[sock]))
        with anyio.fail_after(5):
            while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
                await anyio.sleep(0.005)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
    sock.close()


# Module scope, not session: the anyio plugin keeps its event loop running while a
# higher-scoped async fixture lives, and later modules' own anyio.run() would then fail.
@pytest.fixture(scope="module")
async def provider_server() -> AsyncIterator[tuple[FakeProvider, str]]:
    fake = FakeProvider(behavior=BEHAVIOR, api_key="sk-upstream")
    async with serve(fake) as url:
        yield fake, url


@pytest.fixture
def provider(provider_server: tuple[FakeProvider, str]) -> tuple[FakeProvider, str]:
    """The fake provider on a real socket, its records reset: (provider, base URL)."""
    fake, url = provider_server
    fake.requests.clear()
    fake.disconnects = 0
    fake.behavior = BEHAVIOR
    return fake, url


def behavior_header(**fields: Any) -> Mapping[str, str]:
    """Upstream headers making the fake provider behave differently for that upstream."""
    return {"x-fake-behavior": json.dumps(fields)}


class Clock:
    """Monotonic timestamps of events in a test."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start
