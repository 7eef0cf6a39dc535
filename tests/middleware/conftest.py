from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest

from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord, Ledger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import ModelPrice, PriceTable
from gatewaykit.upstream import Upstream
from tests.middleware.fake_ledger import FakeLedger

MASTER_KEY = "gk-master-0123456789abcdef0123456789"
PRICES = PriceTable(
    {
        # $1 / $2 per million: 1 token in = 1 µUSD, 1 token out = 2 µUSD
        "gpt-test": ModelPrice(Decimal(1), Decimal(2)),
        "claude-test": ModelPrice(Decimal(1), Decimal(2), Decimal("0.1"), Decimal("1.25")),
    }
)
UPSTREAMS = (
    Upstream("https://openai.example/v1", api_key="sk-upstream-secret", provider="openai"),
    Upstream("https://anthropic.example", api_key="sk-ant-upstream-secret", provider="anthropic"),
)

MakeKey = Callable[..., Awaitable[tuple[str, ApiKeyRecord]]]


@contextlib.asynccontextmanager
async def open_backend(name: str) -> AsyncIterator[Ledger]:
    """A fresh ledger of backend ``name``; its invariants are checked when it closes."""
    if name == "fake":
        fake = FakeLedger()
        yield fake
        assert await fake.check() == []
        return
    if name == "sqlite":
        from gatewaykit.ledger.sqlite import SQLiteLedger

        real: Ledger = SQLiteLedger(":memory:")
        async with real:
            yield real
            assert await real.check() == []
        return
    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    async with (
        fresh_schema("gk_mw") as schema,
        PostgresLedger(DSN, schema=schema, pool_max=4) as pg,
    ):
        yield pg
        assert await pg.check() == []


@pytest.fixture(params=["fake", "sqlite"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    async with open_backend(request.param) as opened:
        yield opened


@pytest.fixture
def make_key(ledger: Ledger) -> MakeKey:
    async def make(user: str = "alice", **fields: Any) -> tuple[str, ApiKeyRecord]:
        new = generate_key()
        record = ApiKeyRecord(
            key_id=new.key_id, key_hash=new.key_hash, prefix=new.prefix, user=user, **fields
        )
        await ledger.create_key(record)
        return new.key, record

    return make


@pytest.fixture
def make_mode(ledger: Ledger) -> Callable[..., StandaloneMode]:
    def make(**options: Any) -> StandaloneMode:
        options.setdefault("prices", PRICES)
        options.setdefault("upstreams", UPSTREAMS)
        options.setdefault("master_key", MASTER_KEY)
        return StandaloneMode(ledger, **options)

    return make


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **extra}


def messages(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}
