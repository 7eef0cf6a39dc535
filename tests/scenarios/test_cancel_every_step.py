"""Cancelling a request at every step of its path leaves the ledger exact.

The request path has no task group any more: one asyncio task watches for disconnects,
a timer heartbeats, anyio cancel scopes shield admission and settlement. This sweeps an
outside cancellation (a server shutting down, a task cancelled) across every loop
iteration of a whole request — middleware, StandaloneMode, adapter, relay, the real SQLite
ledger and its writer thread — and checks after each that no hold is left live and the
ledger's invariants hold. A client disconnect is swept the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, MutableMapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware, ModelPrice, SQLiteLedger, StandaloneMode, Upstream
from gatewaykit.adapters import gateway_routes
from gatewaykit.http import Timeouts
from gatewaykit.keys import display_prefix, hash_key
from gatewaykit.ledger.base import ApiKeyRecord, HoldState

pytestmark = pytest.mark.anyio

KEY = "gk_k1_secretsecretsecretsecret"
_EVENT = b'data: {"choices":[{"index":0,"delta":{"content":"tok "}}],"usage":null}\n\n'
_USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}\n\n'
_BODY = json.dumps(
    {
        "choices": [{"message": {"content": "hi"}}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1},
    }
).encode()


class _Response:
    def __init__(self, stream: bool) -> None:
        self.status = 200
        kind = "text/event-stream" if stream else "application/json"
        self.headers = {"content-type": kind}
        self.raw_headers = [(b"content-type", kind.encode())]

    async def read(self, limit: int) -> bytes:
        await asyncio.sleep(0)
        return _BODY

    async def chunks(self) -> AsyncIterator[bytes]:
        for _ in range(3):
            await asyncio.sleep(0)
            yield _EVENT
        await asyncio.sleep(0)
        yield _USAGE + b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        await asyncio.sleep(0)


class _Upstream:
    """An UpstreamClient that yields to the loop at every step, like a real one."""

    async def request(
        self, method: str, url: str, *, body: bytes, headers: Any, timeouts: Timeouts
    ) -> _Response:
        await asyncio.sleep(0)
        return _Response(b'"stream":true' in body)


async def _ledger(path: Path) -> SQLiteLedger:
    ledger = SQLiteLedger(str(path))
    await ledger.open()
    await ledger.create_key(
        ApiKeyRecord(key_id="k1", key_hash=hash_key(KEY), prefix=display_prefix(KEY), user="u")
    )
    await ledger.set_budget("user:u", limit=Decimal(100))
    return ledger


def _app(ledger: SQLiteLedger) -> Starlette:
    price = ModelPrice(input_per_mtok=Decimal(1), output_per_mtok=Decimal(2))
    mode = StandaloneMode(
        ledger, prices={"m": price}, upstreams=[Upstream(base_url="http://up.invalid/v1")]
    )
    return Starlette(
        routes=gateway_routes(client=_Upstream()),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )


async def _request(
    app: Starlette, stream: bool, gone: asyncio.Event
) -> list[MutableMapping[str, Any]]:
    body = json.dumps(
        {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {KEY}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
        "state": {},
    }
    pending: list[MutableMapping[str, Any]] = [
        {"type": "http.request", "body": body, "more_body": False}
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            gone.set()  # like uvicorn: once the response is complete, receive() returns

    await app(scope, receive, send)
    return sent


async def _steps(app: Starlette, stream: bool) -> int:
    """How many loop iterations one whole request takes (at least)."""
    task = asyncio.ensure_future(_request(app, stream, asyncio.Event()))
    steps = 0
    while not task.done():
        await asyncio.sleep(0)
        steps += 1
    await task
    return steps


async def _settled(ledger: SQLiteLedger) -> None:
    for _ in range(500):  # the last settle may still be in the writer's hands
        if not await ledger.holds(live_only=True):
            break
        await asyncio.sleep(0.002)
    assert await ledger.holds(live_only=True) == []
    assert await ledger.check() == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("how", ["cancel", "disconnect"])
async def test_stopping_a_request_at_every_step_leaves_the_ledger_exact(
    tmp_path: Path, stream: bool, how: str
) -> None:
    ledger = await _ledger(tmp_path / "l.db")  # a file, so commits take real time
    try:
        app = _app(ledger)
        steps = await _steps(app, stream)
        assert steps > 5
        # Every step early on (admission, the upstream call, the first events), then a
        # stride: later iterations are mostly the loop spinning while the writer thread
        # commits, and cancelling at each of them adds time, not cases.
        points = sorted({*range(min(steps, 80)), *range(80, steps + 3, max(1, steps // 40))})
        for step in points:
            gone = asyncio.Event()
            task = asyncio.ensure_future(_request(app, stream, gone))
            for _ in range(step):
                await asyncio.sleep(0)
            if how == "cancel":
                task.cancel()
            else:
                gone.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            try:
                await _settled(ledger)
            except AssertionError:
                raise AssertionError(f"leaked at step {step} of {steps}") from None
        states = {hold.state for hold in await ledger.holds(live_only=False, limit=10_000)}
        assert states <= {HoldState.SETTLED, HoldState.RELEASED}
    finally:
        await ledger.aclose()
