"""Fixtures for the adversarial end-to-end scenarios: the real stack (GatewayMiddleware +
StandaloneMode + the adapters + SQLiteLedger) in front of the fake provider on a socket.

Every test that uses ``ledger`` is checked afterwards: no invariant violation and no live
hold, whatever happened to the request."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import ModelPrice
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Upstream
from tests.adapters.conftest import serve

#: $1 in, $2 out per million tokens: one token in costs 1 µ$, one out 2 µ$.
PRICE = ModelPrice(Decimal(1), Decimal(2))
BEHAVIOR = FakeBehavior(events=4, input_tokens=20)
MASTER = "gk-master-0123456789abcdef"
UPSTREAM_KEY = "sk-upstream-SECRET-4242"

Build = Callable[..., Starlette]


@pytest.fixture(scope="module")
async def provider_server() -> AsyncIterator[tuple[FakeProvider, str]]:
    fake = FakeProvider(behavior=BEHAVIOR, api_key=UPSTREAM_KEY)
    async with serve(fake) as url:
        yield fake, url


@pytest.fixture
def provider(provider_server: tuple[FakeProvider, str]) -> tuple[FakeProvider, str]:
    fake, url = provider_server
    fake.requests.clear()
    fake.disconnects = 0
    fake.behavior = BEHAVIOR
    return fake, url


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


async def new_key(ledger: Any, user: str = "alice", **fields: Any) -> tuple[str, ApiKeyRecord]:
    key = generate_key()
    record = ApiKeyRecord(
        key_id=key.key_id, key_hash=key.key_hash, prefix=key.prefix, user=user, **fields
    )
    await ledger.create_key(record)
    return key.key, record


def upstreams(url: str, **options: Any) -> list[Upstream]:
    return [
        Upstream(f"{url}/v1", api_key=UPSTREAM_KEY, provider="openai", **options),
        Upstream(url, api_key=UPSTREAM_KEY, provider="anthropic", **options),
    ]


@pytest.fixture
def build(ledger: SQLiteLedger, client: AiohttpClient, provider: tuple[FakeProvider, str]) -> Build:
    _, url = provider

    def make(
        *,
        routes: dict[str, Any] | None = None,
        models: frozenset[str] | None = None,
        base: str | None = None,
        **options: Any,
    ) -> Starlette:
        options.setdefault("master_key", MASTER)
        configured = upstreams(base or url, models=models)
        mode = StandaloneMode(ledger, prices={"test-model": PRICE}, upstreams=configured, **options)
        return Starlette(
            routes=gateway_routes(client=client, **(routes or {})),
            middleware=[Middleware(GatewayMiddleware, mode=mode)],
        )

    return make


async def spent(ledger: Any, scope: str = "user:alice") -> Decimal:
    status = await ledger.status(scope)
    assert status is not None
    amount: Decimal = status.spent
    return amount


class Scripted:
    """An upstream that answers every request with ``status`` and the byte ``chunks``,
    then ends the response normally, or drops the connection when ``drop`` is set."""

    def __init__(self) -> None:
        self.status = 200
        self.chunks: list[bytes] = []
        self.drop = False
        self.gap = 0.0  # seconds between chunks (so they arrive as separate reads)
        self.delay = 0.0  # seconds before the response starts
        self.content_type = b"text/event-stream"
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        if self.delay:
            await anyio.sleep(self.delay)
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", self.content_type)],
            }
        )
        for index, chunk in enumerate(self.chunks):
            if index and self.gap:
                await anyio.sleep(self.gap)
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self.drop:
            raise RuntimeError("scripted upstream drops the connection")
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture(scope="module")
async def scripted_server() -> AsyncIterator[tuple[Scripted, str]]:
    scripted = Scripted()
    async with serve(scripted) as url:
        yield scripted, url


@pytest.fixture
def scripted(scripted_server: tuple[Scripted, str]) -> tuple[Scripted, str]:
    upstream, url = scripted_server
    upstream.status, upstream.chunks, upstream.drop, upstream.requests = 200, [], False, 0
    upstream.gap = upstream.delay = 0.0
    upstream.content_type = b"text/event-stream"
    return upstream, url
