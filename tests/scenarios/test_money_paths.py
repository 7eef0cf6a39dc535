"""Concurrency and disconnects at every point of a request's life, through the real stack.

After each test (the ``ledger`` fixture): ``check()`` is clean and no hold is live."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import gateway_routes
from gatewaykit.ledger.base import Ledger
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import estimate_cost
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.usage import Usage
from tests.asgi import Exchange, call
from tests.scenarios.conftest import PRICE, Build, Scripted, new_key, spent, upstreams
from tests.scenarios.test_upstream import chat_chunk

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
PROMPT = "hello there"  # 11 characters: 3 prompt tokens in the estimate


def chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "test-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 100,
        "stream": True,
        **extra,
    }


HOLD = estimate_cost(PRICE, prompt_tokens=3, max_output_tokens=100)


async def run_concurrently(app: Any, headers: dict[str, str], n: int) -> list[Exchange]:
    exchanges = [Exchange() for _ in range(n)]

    async def one(ex: Exchange) -> None:
        await call(app, CHAT, json_body=chat(), headers=headers, exchange=ex)

    async with anyio.create_task_group() as group:
        for ex in exchanges:
            group.start_soon(one, ex)
    return exchanges


async def assert_exactly_k_admitted(ledger: Ledger, app: Any, headers: dict[str, str]) -> None:
    k, n = 5, 16
    await ledger.set_budget("user:alice", limit=HOLD * (k + 1) - Decimal("0.000000001"))
    exchanges = await run_concurrently(app, headers, n)
    statuses = sorted(ex.status for ex in exchanges)
    assert statuses == [200] * k + [402] * (n - k)
    for ex in exchanges:
        if ex.status == 402:
            error = ex.json()["error"]
            assert error["code"] == "budget_exceeded"
            assert error["scope"] == "user:alice"
            assert Decimal(error["held"]) + Decimal(error["spent"]) <= HOLD * k
            assert Decimal(error["remaining"]) < HOLD
            assert set(error) >= {"limit", "spent", "held", "remaining", "resets_at"}
    actual = PRICE.cost(Usage(input_tokens=20, output_tokens=4))
    assert await spent(ledger) == actual * k
    assert await ledger.holds() == []
    assert await ledger.check() == []


async def test_concurrent_streams_admit_exactly_k(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=4, input_tokens=20, first_event_delay=0.4)
    key, _ = await new_key(ledger)
    await assert_exactly_k_admitted(ledger, build(), {"authorization": f"Bearer {key}"})


@pytest.fixture
async def pg_ledger() -> AsyncIterator[Ledger]:
    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    async with fresh_schema("gk_scen") as schema, PostgresLedger(DSN, schema=schema) as store:
        yield store


@pytest.mark.postgres
async def test_concurrent_streams_admit_exactly_k_on_postgres(
    pg_ledger: Ledger, client: httpx.AsyncClient, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    fake.behavior = FakeBehavior(events=4, input_tokens=20, first_event_delay=0.4)
    key, _ = await new_key(pg_ledger)
    mode = StandaloneMode(pg_ledger, prices={"test-model": PRICE}, upstreams=upstreams(url))
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    await assert_exactly_k_admitted(pg_ledger, app, {"authorization": f"Bearer {key}"})


# -- disconnects ---------------------------------------------------------------------------


async def auth(ledger: SQLiteLedger) -> dict[str, str]:
    await ledger.set_budget("user:alice", limit=Decimal(1))
    key, _ = await new_key(ledger)
    return {"authorization": f"Bearer {key}"}


async def test_disconnect_while_the_body_arrives_admits_nothing(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str]
) -> None:
    fake, _ = provider
    headers = await auth(ledger)
    ex = await call(build(), CHAT, json_body=chat(), headers=headers, disconnect_during_body=True)
    assert ex.sent == []
    assert fake.requests == []
    assert await ledger.usage() == []


async def test_disconnect_right_after_admission_releases_or_charges_prompt(
    build: Build, ledger: SQLiteLedger
) -> None:
    """The client is gone before the app runs: the hold is closed either way."""
    headers = await auth(ledger)
    ex = Exchange()
    ex.disconnect()
    await call(build(), CHAT, json_body=chat(), headers=headers, exchange=ex)
    [record] = await ledger.usage()
    assert record.status == "incomplete"
    assert await spent(ledger) == record.cost
    assert record.cost <= PRICE.cost(Usage(input_tokens=3))


async def disconnect_after(
    app: Any, headers: dict[str, str], fake: FakeProvider, delay: float
) -> tuple[Exchange, float]:
    ex = Exchange()
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: call(app, CHAT, json_body=chat(), headers=headers, exchange=ex))
        with anyio.fail_after(3):
            while not fake.requests:  # noqa: ASYNC110 - the fake exposes only a list
                await anyio.sleep(0.01)
        await anyio.sleep(delay)
        started = time.monotonic()
        ex.disconnect()
    return ex, time.monotonic() - started


@pytest.mark.parametrize(
    "behavior",
    [
        FakeBehavior(first_byte_delay=30),  # before the upstream answers at all
        FakeBehavior(first_event_delay=30),  # headers received, no event yet
    ],
    ids=["before-first-byte", "before-first-event"],
)
async def test_client_leaving_a_silent_upstream_is_noticed_promptly(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str], behavior: FakeBehavior
) -> None:
    fake, _ = provider
    fake.behavior = behavior
    headers = await auth(ledger)
    ex, took = await disconnect_after(build(), headers, fake, 0.1)
    assert took < 1.0  # not after the upstream's 30 s
    assert ex.sent == []
    [record] = await ledger.usage()
    assert record.status == "incomplete"
    # The provider had the prompt: the prompt estimate, nothing for output.
    assert (record.usage_source, record.input_tokens, record.output_tokens) == ("estimated", 3, 0)
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=3))
    if behavior.first_event_delay:
        with anyio.fail_after(2):
            while fake.disconnects < 1:  # noqa: ASYNC110 - the fake exposes only a counter
                await anyio.sleep(0.01)  # the upstream stream was closed, not left running


async def test_client_leaving_mid_stream_during_a_long_gap(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str]
) -> None:
    upstream, url = scripted
    upstream.chunks = [chat_chunk("abcdefgh"), chat_chunk("never sent")]
    upstream.gap = 30
    headers = await auth(ledger)

    def after_first_piece(sent: list[Any]) -> bool:
        return any(b"abcdefgh" in m.get("body", b"") for m in sent)

    started = time.monotonic()
    ex = await call(
        build(base=url), CHAT, json_body=chat(), headers=headers, disconnect=after_first_piece
    )
    assert time.monotonic() - started < 2  # noticed during the 30 s silence
    assert not ex.complete
    [record] = await ledger.usage()
    assert record.status == "incomplete"
    assert (record.input_tokens, record.output_tokens) == (3, 2)  # prompt estimate, 8 chars
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=3, output_tokens=2))


@pytest.mark.parametrize("marker", [b"[DONE]", b'"usage"'], ids=["at-done", "at-usage-chunk"])
async def test_disconnect_at_or_after_the_final_event_charges_the_provider_usage(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str], marker: bytes
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=20)
    headers = await auth(ledger)

    def at_marker(sent: list[Any]) -> bool:
        return any(marker in m.get("body", b"") for m in sent)

    body = chat(stream_options={"include_usage": True})
    await call(build(), CHAT, json_body=body, headers=headers, disconnect=at_marker)
    [record] = await ledger.usage()
    # At [DONE] the request was settled before the final event went out: a success. At the
    # usage chunk the client left before [DONE]: incomplete, but charged exactly what the
    # provider reported (not inflated by the character estimate).
    expected_status = "success" if marker == b"[DONE]" else "incomplete"
    assert (record.status, record.usage_source) == (expected_status, "provider")
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=20, output_tokens=3))


async def test_disconnect_after_a_complete_json_response_charges_once(
    build: Build, ledger: SQLiteLedger
) -> None:
    headers = await auth(ledger)
    for _ in range(3):
        ex = await call(build(), CHAT, json_body=chat(stream=False), headers=headers)
        assert ex.status == 200
    assert len(await ledger.usage()) == 3
    assert await spent(ledger) == 3 * PRICE.cost(Usage(input_tokens=20, output_tokens=4))


@pytest.mark.parametrize(
    ("path", "body", "marker"),
    [
        (
            MESSAGES,
            {
                "model": "test-model",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": PROMPT}],
            },
            b"message_delta",
        ),
        (MESSAGES, {"model": "test-model", "max_tokens": 50, "messages": []}, b"message_stop"),
        ("/v1/responses", {"model": "test-model", "input": PROMPT}, b"response.completed"),
    ],
    ids=["messages-at-delta", "messages-at-stop", "responses-at-completed"],
)
async def test_disconnect_at_the_final_events_of_the_other_formats(
    build: Build,
    ledger: SQLiteLedger,
    provider: tuple[FakeProvider, str],
    path: str,
    body: dict[str, Any],
    marker: bytes,
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=20, delay=0.01)
    headers = await auth(ledger)

    def at_marker(sent: list[Any]) -> bool:
        return any(marker in m.get("body", b"") for m in sent)

    await call(
        build(), path, json_body={**body, "stream": True}, headers=headers, disconnect=at_marker
    )
    [record] = await ledger.usage()
    assert record.usage_source == "provider"
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=20, output_tokens=3))


@pytest.mark.postgres
async def test_client_leaving_mid_stream_on_postgres(
    pg_ledger: Ledger, client: httpx.AsyncClient, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    fake.behavior = FakeBehavior(events=50, input_tokens=20, delay=0.02)
    await pg_ledger.set_budget("user:alice", limit=Decimal(1))
    key, _ = await new_key(pg_ledger)
    mode = StandaloneMode(pg_ledger, prices={"test-model": PRICE}, upstreams=upstreams(url))
    app = Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )

    def after_two_pieces(sent: list[Any]) -> bool:
        return any(b"tok1" in m.get("body", b"") for m in sent)

    ex = await call(
        app,
        CHAT,
        json_body=chat(),
        headers={"authorization": f"Bearer {key}"},
        disconnect=after_two_pieces,
    )
    assert not ex.complete
    [record] = await pg_ledger.usage()
    assert record.status == "incomplete"
    assert await spent(pg_ledger) == record.cost > 0
    assert await pg_ledger.holds() == []
    assert await pg_ledger.check() == []


@pytest.mark.parametrize("stream", [True, False])
async def test_a_response_outliving_its_hold_ttl_is_kept_alive_and_charged(
    build: Build, ledger: SQLiteLedger, scripted: tuple[Scripted, str], stream: bool
) -> None:
    """A sweeper running during a response longer than the hold TTL must not expire it:
    the middleware's heartbeat extends the hold, and the charge lands on time."""
    upstream, url = scripted
    usage = {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
    if stream:
        upstream.chunks = [
            chat_chunk("a"),
            chat_chunk("b"),
            chat_chunk("c"),
            chat_chunk(usage=usage),
            b"data: [DONE]\n\n",
        ]
        upstream.gap = 0.3
    else:
        upstream.gap = 0
        upstream.chunks = [b'{"choices": [], "usage": ' + json.dumps(usage).encode() + b"}"]
        upstream.delay = 1.3
    headers = await auth(ledger)
    app = build(base=url, hold_ttl=0.6)
    swept = 0

    async def sweeper() -> None:
        nonlocal swept
        while True:
            await anyio.sleep(0.1)
            swept += await ledger.sweep()

    async with anyio.create_task_group() as group:
        group.start_soon(sweeper)
        ex = await call(app, CHAT, json_body=chat(stream=stream), headers=headers)
        group.cancel_scope.cancel()
    assert ex.status == 200
    assert swept == 0
    [record] = await ledger.usage()
    assert record.status == "success"
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=30, output_tokens=7))
