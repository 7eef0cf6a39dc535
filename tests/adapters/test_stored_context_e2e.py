"""Issue 11 §1, end to end: GatewayMiddleware + StandaloneMode + the responses adapter +
a real ledger (SQLite and PostgreSQL), in front of the fake provider, which — like
OpenAI — bills a request continuing a stored response or conversation for the whole
stored context. The hold must cover that, not just the new input."""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anyio
import httpx2
import openai
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.http import AiohttpClient
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord, Ledger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import ModelPrice
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Upstream
from tests.adapters.conftest import serve
from tests.asgi import Exchange, call
from tests.middleware.conftest import open_backend

pytestmark = pytest.mark.anyio

MICRO = Decimal("0.000001")
WINDOW = 128_000
#: $1 in, $2 out per million tokens: one token in costs 1 µ$, one out 2 µ$.
PRICES = {
    "test-model": ModelPrice(Decimal(1), Decimal(2), context_window=WINDOW),
    "no-window": ModelPrice(Decimal(1), Decimal(2)),
}
#: The new turns: "continue" is 8 characters, estimated at 2 tokens — exactly what the
#: fake provider bills for them (input_tokens=2), so every hold is exact but for output.
SMALL = FakeBehavior(events=4, input_tokens=2)
MAX_OUTPUT = 10
LONG = 100_000  # tokens of prompt in the long stored conversation (≈ $0.10 per turn here)


@pytest.fixture(scope="module")
async def provider_server() -> AsyncIterator[tuple[FakeProvider, str]]:
    fake = FakeProvider(behavior=SMALL, api_key="sk-upstream")
    async with serve(fake) as url:
        yield fake, url


@pytest.fixture
def provider(provider_server: tuple[FakeProvider, str]) -> tuple[FakeProvider, str]:
    fake, url = provider_server
    fake.requests.clear()
    fake.behavior = SMALL
    return fake, url


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[AiohttpClient]:
    async with default_client() as http:
        yield http


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    async with open_backend(request.param) as opened:  # check() == [] when it closes
        yield opened
        assert await opened.holds() == []  # nothing leaked


def build(ledger: Ledger, client: AiohttpClient, url: str, **options: Any) -> Starlette:
    mode = StandaloneMode(
        ledger,
        prices=PRICES,
        upstreams=[Upstream(f"{url}/v1", api_key="sk-upstream", provider="openai")],
        **options,
    )
    return Starlette(
        routes=gateway_routes(client=client),
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )


async def new_key(ledger: Ledger, user: str) -> str:
    key = generate_key()
    record = ApiKeyRecord(key_id=key.key_id, key_hash=key.key_hash, prefix=key.prefix, user=user)
    await ledger.create_key(record)
    return key.key


def turn(model: str = "test-model", **extra: Any) -> dict[str, Any]:
    return {"model": model, "input": "continue", "max_output_tokens": MAX_OUTPUT, **extra}


async def post(app: Starlette, key: str, body: dict[str, Any]) -> Exchange:
    return await call(
        app, "/v1/responses", json_body=body, headers={"authorization": f"Bearer {key}"}
    )


async def spent(ledger: Ledger, scope: str = "user:alice") -> Decimal:
    status = await ledger.status(scope)
    return Decimal(0) if status is None else status.spent


def response_id_of(ex: Exchange) -> str:
    """The response id in a JSON body or a stream (its first ``resp_`` id)."""
    found = re.search(rb'"id": ?"(resp_[^"]+)"', ex.body)
    assert found is not None, ex.body
    return found.group(1).decode()


def hold_for(context_tokens: int) -> Decimal:
    """What a turn holds: its 2 new prompt tokens and the stored context at 1 µ$, its
    output cap at 2 µ$."""
    return (2 + context_tokens + 2 * MAX_OUTPUT) * MICRO


async def long_conversation(
    app: Starlette, fake: FakeProvider, key: str, ledger: Ledger
) -> tuple[str, int]:
    """A first response with a long prompt, served through the gateway: (id, its context)."""
    fake.behavior = FakeBehavior(events=4, input_tokens=LONG)
    first = await post(app, key, turn(input="x" * (4 * LONG)))
    fake.behavior = SMALL
    assert first.status == 200, first.body
    response_id: str = first.json()["id"]
    context = LONG + SMALL.events
    assert fake.stored[response_id] == context  # what OpenAI would bill a continuation for
    assert await ledger.response_context(response_id, "user:alice") == context
    return response_id, context


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_chained_turn_holds_and_is_charged_the_stored_context(
    stream: bool, ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    app = build(ledger, client, url)
    key = await new_key(ledger, "alice")
    await ledger.set_budget("user:alice", limit=Decimal(1))
    response_id, context = await long_conversation(app, fake, key, ledger)
    before = await spent(ledger)

    second = await post(app, key, turn(previous_response_id=response_id, stream=stream))
    assert second.status == 200, second.body
    # The hold covered the stored context: remaining = limit − spent − this hold.
    remaining = Decimal(second.headers["x-gatewaykit-budget-remaining"])
    assert remaining == Decimal(1) - before - hold_for(context)
    # The provider billed it, and the gateway charged exactly that.
    billed = context + SMALL.input_tokens
    assert fake.requests[-1].body["previous_response_id"] == response_id
    assert await spent(ledger) - before == (billed + 2 * SMALL.events) * MICRO
    [record, _] = await ledger.usage()
    assert record.input_tokens == billed
    # ... and the new response's context is remembered for the next turn.
    new_id = response_id_of(second)
    assert await ledger.response_context(new_id, "user:alice") == billed + SMALL.events
    assert fake.stored[new_id] == billed + SMALL.events


@pytest.mark.parametrize(
    ("room_holds", "admitted"),
    [(0, 0), (3, 3)],
    ids=["room-for-10-naive-holds", "room-for-3-real-holds"],
)
async def test_parallel_chained_turns_are_admitted_only_as_far_as_the_budget_covers(
    room_holds: int,
    admitted: int,
    ledger: Ledger,
    client: AiohttpClient,
    provider: tuple[FakeProvider, str],
) -> None:
    """The issue's scenario: room for 10 holds of what the new input alone would cost, 10
    parallel requests continuing a long stored conversation. Before the fix every one was
    admitted (a 22 µ$ hold each) and billed ≈ $0.10 each: 4,500× the room."""
    fake, url = provider
    app = build(ledger, client, url)
    key = await new_key(ledger, "alice")
    response_id, context = await long_conversation(app, fake, key, ledger)
    before = await spent(ledger)
    naive_hold = hold_for(0)
    real_hold = hold_for(context)
    room = 10 * naive_hold + room_holds * real_hold
    limit = before + room
    await ledger.set_budget("user:alice", limit=limit)
    requests_before = len(fake.requests)

    results: list[Exchange] = []

    async def one() -> None:
        results.append(await post(app, key, turn(previous_response_id=response_id)))

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(one)

    statuses = sorted(r.status for r in results)
    assert statuses == [200] * admitted + [402] * (10 - admitted)
    assert len(fake.requests) - requests_before == admitted  # refusals never reached it
    for refused in (r for r in results if r.status == 402):
        error = refused.json()["error"]
        assert error["code"] == "budget_exceeded"
        assert Decimal(error["requested"]) == real_hold
    billed = (context + SMALL.input_tokens + 2 * SMALL.events) * MICRO
    assert await spent(ledger) - before == admitted * billed
    # The documented bound: with the context remembered, a turn's charge is within its
    # hold (the new prompt's estimate is exact here), so spend never passes the limit.
    assert await spent(ledger) <= limit
    assert math.floor(room / real_hold) == admitted
    assert await ledger.check() == []


async def test_another_users_response_id_is_unknown_to_them(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    app = build(ledger, client, url)
    alice = await new_key(ledger, "alice")
    bob = await new_key(ledger, "bob")
    response_id, _ = await long_conversation(app, fake, alice, ledger)
    assert await ledger.response_context(response_id, "user:bob") is None
    # Bob continuing Alice's response is held at the whole context window, as for an id
    # the gateway never saw — his small budget shows it without reaching the provider.
    await ledger.set_budget("user:bob", limit=Decimal("0.05"))
    requests_before = len(fake.requests)
    foreign = await post(app, bob, turn(previous_response_id=response_id))
    never_seen = await post(app, bob, turn(previous_response_id="resp_never_seen"))
    for ex in (foreign, never_seen):
        assert ex.status == 402
        assert Decimal(ex.json()["error"]["requested"]) == hold_for(WINDOW)
    assert len(fake.requests) == requests_before
    # Under the reject policy both are the same 400, which says nothing about Alice.
    strict = build(ledger, client, url, unknown_response_context="reject")
    foreign = await post(strict, bob, turn(previous_response_id=response_id))
    never_seen = await post(strict, bob, turn(previous_response_id="resp_never_seen"))
    assert foreign.status == never_seen.status == 400
    assert foreign.json()["error"]["message"].replace(response_id, "?") == never_seen.json()[
        "error"
    ]["message"].replace("resp_never_seen", "?")
    # Alice herself still continues it under the reject policy.
    own = await post(strict, alice, turn(previous_response_id=response_id))
    assert own.status == 200
    assert len(fake.requests) == requests_before + 1


async def test_an_unknown_id_is_held_at_the_context_window(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    app = build(ledger, client, url)
    key = await new_key(ledger, "alice")
    await ledger.set_budget("user:alice", limit=Decimal(1))
    # The provider does not know it either: 400, refunded; the hold was the window.
    ex = await post(app, key, turn(previous_response_id="resp_from_elsewhere"))
    assert ex.status == 400
    assert fake.requests[-1].body["previous_response_id"] == "resp_from_elsewhere"
    assert await spent(ledger) == 0
    # A conversation created outside the gateway, in turn: held at the window, then
    # remembered as what the provider billed.
    fake.conversations["conv_outside"] = 5_000
    first = await post(app, key, turn(conversation="conv_outside"))
    assert first.status == 200
    assert Decimal(first.headers["x-gatewaykit-budget-remaining"]) == Decimal(1) - hold_for(WINDOW)
    grown = 5_000 + SMALL.input_tokens + SMALL.events
    assert await ledger.response_context("conv_outside", "user:alice") == grown
    before = await spent(ledger)
    second = await post(app, key, turn(conversation={"id": "conv_outside"}))
    assert second.status == 200
    remaining = Decimal(second.headers["x-gatewaykit-budget-remaining"])
    assert remaining == Decimal(1) - before - hold_for(grown)
    assert fake.conversations["conv_outside"] == grown + SMALL.input_tokens + SMALL.events
    assert (
        await ledger.response_context("conv_outside", "user:alice")
        == fake.conversations["conv_outside"]
    )


async def test_reject_policy_and_models_without_a_window_answer_400(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    key = await new_key(ledger, "alice")
    requests_before = len(fake.requests)
    strict = build(ledger, client, url, unknown_response_context="reject")
    ex = await post(strict, key, turn(previous_response_id="resp_unknown"))
    assert ex.status == 400
    error = ex.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "unknown_previous_response"
    assert error["param"] == "previous_response_id"
    assert "resp_unknown" in error["message"]
    ex = await post(strict, key, turn(conversation="conv_unknown"))
    assert (ex.status, ex.json()["error"]["code"]) == (400, "unknown_conversation")
    # Without a context window an unknown id cannot be bounded: 400 under either policy.
    lax = build(ledger, client, url)
    ex = await post(lax, key, turn("no-window", previous_response_id="resp_unknown"))
    assert (ex.status, ex.json()["error"]["code"]) == (400, "unknown_previous_response")
    assert "context_window" in ex.json()["error"]["message"]
    assert len(fake.requests) == requests_before  # none of them reached the provider
    # A known one is fine on a model without a window.
    first = await post(lax, key, turn("no-window"))
    chained = await post(lax, key, turn("no-window", previous_response_id=first.json()["id"]))
    assert chained.status == 200
    # Malformed ids are the client's 400 too.
    ex = await post(lax, key, turn(previous_response_id=42))
    assert (ex.status, ex.json()["error"]["param"]) == (400, "previous_response_id")


async def test_the_openai_sdk_sees_the_refusal_as_a_bad_request(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    _, url = provider
    key = await new_key(ledger, "alice")
    app = build(ledger, client, url, unknown_response_context="reject")
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://gw") as http:
        sdk = openai.AsyncOpenAI(
            base_url="http://gw/v1", api_key=key, http_client=http, max_retries=0
        )
        with pytest.raises(openai.BadRequestError) as info:
            await sdk.responses.create(
                model="test-model", input="continue", previous_response_id="resp_nope"
            )
    assert info.value.code == "unknown_previous_response"
    assert info.value.param == "previous_response_id"


async def test_unstored_and_failed_responses_are_not_remembered(
    ledger: Ledger, client: AiohttpClient, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    app = build(ledger, client, url)
    key = await new_key(ledger, "alice")
    unstored = await post(app, key, turn(store=False))
    assert unstored.status == 200
    assert await ledger.response_context(unstored.json()["id"], "user:alice") is None
    # A stream cut by the provider mid-way: charged what was observed, not remembered,
    # so a continuation of it would be held at the window rather than too little.
    fake.behavior = FakeBehavior(events=4, input_tokens=2, fail_after=2, fail_mode="error")
    broken = await post(app, key, turn(stream=True))
    fake.behavior = SMALL
    assert broken.status == 200
    assert await ledger.response_context(response_id_of(broken), "user:alice") is None
    [record, *_] = await ledger.usage()
    assert record.status == "error"
