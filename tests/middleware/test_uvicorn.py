"""Disconnects through a real server (uvicorn), whose receive() semantics differ from the
raw driver's: it declares ASGI spec 2.3 and answers http.disconnect once a response is
complete, even on a live keep-alive connection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gatewaykit import GatewayMiddleware, get_settlement
from gatewaykit.ledger.base import Ledger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.settlement import Settlement
from gatewaykit.usage import Usage
from tests.middleware.conftest import MakeKey, bearer, chat
from tests.middleware.fake_ledger import FakeLedger

pytestmark = pytest.mark.anyio
MICRO = Decimal("0.000001")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Any], Any]]:
    async with anyio.create_task_group() as tg:
        servers: list[uvicorn.Server] = []

        async def start(app: Any) -> str:
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=0,
                log_level="warning",
                lifespan="off",
                timeout_keep_alive=75,  # above the gateway client's keep-alive
            )
            server = uvicorn.Server(config)
            servers.append(server)
            tg.start_soon(server.serve)
            with anyio.fail_after(5):
                while not server.started:  # noqa: ASYNC110 - uvicorn offers no event
                    await anyio.sleep(0.01)
            port = server.servers[0].sockets[0].getsockname()[1]
            return f"http://127.0.0.1:{port}"

        yield start
        for server in servers:
            server.should_exit = True


@pytest.mark.parametrize("heartbeat", [None, 0.01])
async def test_client_leaving_mid_stream_is_noticed_while_the_upstream_is_silent(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    serve: Callable[[Any], Any],
    heartbeat: float | None,
) -> None:
    """With a short heartbeat the pending receive() is cancelled and re-issued many times
    before the client leaves; uvicorn must still deliver the disconnect."""
    key, _ = await make_key("alice")
    settlements: list[Settlement] = []
    cancelled = anyio.Event()

    async def endpoint(request: Request) -> Response:
        settlement = get_settlement(request)
        settlements.append(settlement)
        settlement.note_upstream_contacted()

        async def body() -> AsyncIterator[bytes]:
            settlement.note_output(20)
            yield b"data: first\n\n"
            try:
                await anyio.sleep_forever()  # the upstream goes quiet
            finally:
                cancelled.set()

        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(
        routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])],
        middleware=[Middleware(GatewayMiddleware, mode=make_mode(), heartbeat_interval=heartbeat)],
    )
    base = await serve(app)
    async with (
        httpx.AsyncClient(base_url=base) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(key)
        ) as response,
    ):
        assert response.status_code == 200
        chunks = response.aiter_raw()  # kept referenced: the connection stays open
        assert await chunks.__anext__() == b"data: first\n\n"
        await anyio.sleep(0.1)  # the upstream is silent; heartbeats run
    # leaving the block closes the connection
    with anyio.fail_after(5):
        await cancelled.wait()
        while not settlements[0].done:  # noqa: ASYNC110 - settled by the middleware
            await anyio.sleep(0.01)
    outcome = settlements[0].outcome
    assert outcome is not None
    assert outcome.status == "incomplete"
    assert outcome.charged == (1 + 2 * 5) * MICRO  # prompt estimate + ceil(20/4) output
    if heartbeat is not None and isinstance(ledger, FakeLedger):
        assert ledger.extends >= 3
    assert await ledger.holds() == []


async def test_keep_alive_requests_are_not_cancelled_after_they_complete(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    serve: Callable[[Any], Any],
) -> None:
    key, _ = await make_key("alice")

    async def endpoint(request: Request) -> Response:
        await get_settlement(request).on_success(Usage(1, 1))
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])],
        middleware=[Middleware(GatewayMiddleware, mode=make_mode())],
    )
    base = await serve(app)
    async with httpx.AsyncClient(base_url=base) as client:
        for _ in range(3):
            response = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
            assert response.status_code == 200
    status = await ledger.status("user:alice")
    assert status is not None
    assert status.spent == 3 * 3 * MICRO
    assert await ledger.holds() == []
