"""StandaloneMode admission: credentials, users, limits, prices, budgets and their errors."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import anyio
import httpx
import httpx2
import openai
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from gatewaykit import GatewayMiddleware, get_settlement
from gatewaykit.context import get_context
from gatewaykit.errors import ConfigurationError, HoldConflictError, LedgerError, SchemaError
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord, Ledger, Period
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import ModelPrice
from gatewaykit.ratelimit import RateLimit
from gatewaykit.upstream import Upstream
from gatewaykit.usage import Usage
from tests.middleware.conftest import (
    MASTER_KEY,
    PRICES,
    UPSTREAMS,
    MakeKey,
    bearer,
    chat,
    messages,
)
from tests.middleware.fake_ledger import FakeLedger

pytestmark = pytest.mark.anyio
MICRO = Decimal("0.000001")
Seen = list[dict[str, Any]]


def app_for(mode: StandaloneMode, seen: Seen | None = None) -> ASGIApp:
    async def endpoint(request: Request) -> Response:
        context = get_context(request)
        if seen is not None:
            seen.append(
                {
                    "user": context.user_id,
                    "key_id": context.key_id,
                    "estimate": context.settlement.estimate,
                    "upstream": context.attempts[0].upstream,
                    "attempts": context.attempts,
                    "request_id": context.request_id,
                }
            )
        await get_settlement(request).on_success(Usage(1, 1))
        if request.url.path == "/v1/messages":
            return JSONResponse(
                {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": context.model,
                    "stop_reason": "end_turn",
                    "usage": {"input_tokens": 1, "output_tokens": 1},
                }
            )
        return JSONResponse(
            {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": context.model,
                "choices": [],
            }
        )

    return Starlette(
        routes=[
            Route("/v1/chat/completions", endpoint, methods=["POST"]),
            Route("/v1/messages", endpoint, methods=["POST"]),
            Route("/v1/responses", endpoint, methods=["POST"]),
        ],
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[ASGIApp], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(app: ASGIApp) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def sdk_openai(app: ASGIApp, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=key,
        base_url="http://testserver/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)),
    )


def sdk_anthropic(app: ASGIApp, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key=key,
        base_url="http://testserver",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)),
    )


async def openai_chat(app: ASGIApp, key: str, **body: Any) -> Any:
    async with sdk_openai(app, key) as client:
        body.setdefault("model", "gpt-test")
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        return await client.chat.completions.create(**body)


async def anthropic_message(app: ASGIApp, key: str, **body: Any) -> Any:
    async with sdk_anthropic(app, key) as client:
        body.setdefault("model", "claude-test")
        body.setdefault("max_tokens", 10)
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        return await client.messages.create(**body)


async def test_valid_key_is_admitted_and_billed_to_its_user(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, record = await make_key("alice")
    seen: Seen = []
    app = app_for(make_mode(), seen)
    completion = await openai_chat(app, key, max_tokens=10)
    assert completion.id == "c1"
    assert seen[0]["user"] == "alice"
    assert seen[0]["key_id"] == record.key_id
    assert seen[0]["upstream"].provider == "openai"
    message = await anthropic_message(app, key)
    assert message.id == "msg_1"
    assert seen[1]["upstream"].provider == "anthropic"
    for scope in ("user:alice", f"key:{record.key_id}"):
        status = await ledger.status(scope)
        assert status is not None
        assert status.spent == 6 * MICRO  # two requests, Usage(1, 1) each
    assert await ledger.holds() == []


async def test_missing_and_unknown_keys_are_401_in_both_envelopes(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    real, _ = await make_key("alice")
    # same prefix, key id and length; only the secret differs
    forged = real[:-6] + ("AAAAAA" if not real.endswith("AAAAAA") else "BBBBBB")
    app = app_for(make_mode())
    for key in ("nonsense", forged):
        with pytest.raises(openai.AuthenticationError) as oa:
            await openai_chat(app, key)
        assert oa.value.code == "invalid_api_key"
        assert oa.value.type == "invalid_request_error"
        with pytest.raises(anthropic.AuthenticationError) as an:
            await anthropic_message(app, key)
        assert an.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    # the forged key gets exactly the unknown-key answer
    with pytest.raises(openai.AuthenticationError) as a:
        await openai_chat(app, forged)
    with pytest.raises(openai.AuthenticationError) as b:
        await openai_chat(app, "gk_000000000000_" + "x" * 43)
    assert a.value.message == b.value.message


async def test_x_api_key_header_authenticates(
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    key, _ = await make_key("alice")
    client = client_for(app_for(make_mode()))
    response = await client.post("/v1/messages", json=messages(), headers={"x-api-key": key})
    assert response.status_code == 200
    missing = await client.post("/v1/messages", json=messages())
    assert missing.status_code == 401
    assert missing.json() == {
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'",
        },
    }
    response = await client.post(
        "/v1/chat/completions", json=chat(), headers={"authorization": f"Basic {key}"}
    )
    assert response.status_code == 401


async def test_revoked_and_expired_keys_are_401(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    mode = make_mode(key_cache_ttl=60)
    app = app_for(mode)
    key, record = await make_key("alice")
    await openai_chat(app, key)  # cached now
    assert await mode.revoke_key(record.key_id)
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        await openai_chat(app, key)
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    expired, _ = await make_key("alice", expires_at=past)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await openai_chat(app, expired)


async def test_key_expiry_reads_the_modes_clock(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    """Expiry is wall time read from the one injected clock: moving it expires the key."""
    clock = [0.0]
    mode = make_mode(key_cache_ttl=0, clock=lambda: clock[0])
    app = app_for(mode)
    soon = datetime.now(timezone.utc) + timedelta(seconds=60)
    key, _ = await make_key("alice", expires_at=soon)
    await openai_chat(app, key)
    clock[0] += 61
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await openai_chat(app, key)


async def test_the_settlement_measures_latency_with_the_modes_clock(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    clock = [100.0]

    async def endpoint(request: Request) -> Response:
        clock[0] += 2.5  # the upstream "takes" 2.5 s of the mode's clock
        await get_settlement(request).on_success(Usage(1, 1))
        return JSONResponse({"choices": [], "usage": {"prompt_tokens": 1}})

    mode = make_mode(clock=lambda: clock[0])
    app = GatewayMiddleware(
        Starlette(routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])]),
        mode=mode,
    )
    key, _ = await make_key("alice")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as client:
        response = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert response.status_code == 200
    [record] = await ledger.usage(user="alice")
    assert record.latency_ms == 2500


class _WithoutKeyEpoch:
    """A ledger that cannot tell when keys change (no ``key_epoch``), as third-party
    backends may be: the key cache then relies on ``key_cache_ttl`` alone."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    def __getattr__(self, name: str) -> Any:
        if name == "key_epoch":
            raise AttributeError(name)
        return getattr(self._ledger, name)


async def test_key_cache_expires_revocations_made_elsewhere(
    ledger: Ledger, make_key: MakeKey
) -> None:
    clock = [0.0]
    blind: Any = _WithoutKeyEpoch(ledger)
    mode = StandaloneMode(
        blind,
        prices=PRICES,
        upstreams=UPSTREAMS,
        key_cache_ttl=5,
        clock=lambda: clock[0],
    )
    app = app_for(mode)
    key, record = await make_key("alice")
    await openai_chat(app, key)
    await ledger.revoke_key(record.key_id)  # e.g. the CLI, in another process
    await openai_chat(app, key)  # still cached: nothing tells this ledger's users
    clock[0] += 5.1
    with pytest.raises(openai.AuthenticationError):
        await openai_chat(app, key)


async def test_key_epoch_ends_cached_lookups_at_once(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    """A revocation the ledger knows of (its key_epoch moved) is refused on the next
    request, however long key_cache_ttl is; so is a key created after a cached miss."""
    mode = make_mode(key_cache_ttl=3600, clock=lambda: 0.0)
    app = app_for(mode)
    key, record = await make_key("alice")
    await openai_chat(app, key)  # cached now
    await ledger.revoke_key(record.key_id)  # not through the mode
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        await openai_chat(app, key)
    new = generate_key()
    with pytest.raises(openai.AuthenticationError, match="invalid"):
        await openai_chat(app, new.key)  # a miss, cached
    await ledger.create_key(
        ApiKeyRecord(key_id=new.key_id, key_hash=new.key_hash, prefix=new.prefix, user="bob")
    )
    await openai_chat(app, new.key)


async def test_master_key_must_name_the_user(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode]
) -> None:
    seen: Seen = []
    app = app_for(make_mode(), seen)
    with pytest.raises(openai.BadRequestError, match="'user'"):
        await openai_chat(app, MASTER_KEY)
    with pytest.raises(anthropic.BadRequestError, match=r"metadata\.user_id"):
        await anthropic_message(app, MASTER_KEY)
    with pytest.raises(openai.BadRequestError, match="whitespace"):
        await openai_chat(app, MASTER_KEY, user="bob smith")
    await openai_chat(app, MASTER_KEY, user="bob")
    await anthropic_message(app, MASTER_KEY, metadata={"user_id": "carol"})
    assert [(s["user"], s["key_id"]) for s in seen] == [("bob", None), ("carol", None)]
    bob = await ledger.status("user:bob")
    assert bob is not None
    assert bob.spent == 3 * MICRO


async def test_an_ordinary_key_may_not_bill_another_user(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    app = app_for(make_mode())
    await openai_chat(app, key, user="alice")  # naming yourself is fine
    with pytest.raises(openai.PermissionDeniedError) as oa:
        await openai_chat(app, key, user="bob")
    assert oa.value.type == "permission_error"
    with pytest.raises(anthropic.PermissionDeniedError):
        await anthropic_message(app, key, metadata={"user_id": "bob"})


async def test_allowed_models_are_enforced(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice", allowed_models=("claude-test",))
    app = app_for(make_mode())
    await anthropic_message(app, key)
    with pytest.raises(openai.PermissionDeniedError, match="gpt-test"):
        await openai_chat(app, key)


async def test_rpm_limit_answers_429_with_rate_limit_headers(
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    key, _ = await make_key("alice", rpm=2)
    app = app_for(make_mode())
    client = client_for(app)
    first = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-ratelimit-limit-tokens" not in first.headers  # no tpm on this key
    assert "x-ratelimit-limit" not in first.headers  # the pre-OpenAI names are gone
    second = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    third = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert third.status_code == 429
    assert 1 <= int(third.headers["retry-after"]) <= 60
    assert 1 <= int(third.headers["retry-after-ms"]) <= 60_000
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.json()["error"]["type"] == "rate_limit_error"
    assert "2 requests per minute" in third.json()["error"]["message"]
    with pytest.raises(openai.RateLimitError) as limited:
        await openai_chat(app, key)
    assert limited.value.response.headers["retry-after"] == third.headers["retry-after"]
    # the master key has no key limits
    for _ in range(3):
        ok = await client.post(
            "/v1/chat/completions", json=chat(user="x"), headers=bearer(MASTER_KEY)
        )
        assert ok.status_code == 200


async def test_default_rpm_applies_to_keys_without_their_own(
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    key, _ = await make_key("alice")
    client = client_for(app_for(make_mode(default_rpm=1)))
    assert (
        await client.post("/v1/messages", json=messages(), headers=bearer(key))
    ).status_code == 200
    limited = await client.post("/v1/messages", json=messages(), headers=bearer(key))
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "rate_limit_error"


async def test_unknown_model_is_404_and_unpriced_model_is_400(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    upstreams = [
        Upstream("https://o.example/v1", provider="openai", models=frozenset({"gpt-test"}))
    ]
    app = app_for(make_mode(upstreams=upstreams, unpriced="allow"))
    with pytest.raises(openai.NotFoundError) as nf:
        await openai_chat(app, key, model="gpt-nowhere")
    assert nf.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError):  # no anthropic upstream at all
        await anthropic_message(app, key)
    app = app_for(make_mode())
    with pytest.raises(openai.BadRequestError) as np:
        await openai_chat(app, key, model="gpt-unpriced")
    assert np.value.code == "model_not_priced"
    assert await ledger.holds(live_only=False) == []


async def test_unpriced_allow_serves_unbudgeted_and_fallback_prices(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    seen: Seen = []
    await openai_chat(app_for(make_mode(unpriced="allow"), seen), key, model="free-model")
    assert seen[-1]["estimate"].amount == 0
    (record,) = await ledger.usage()
    assert (record.model, record.cost, record.input_tokens) == ("free-model", Decimal(0), 1)
    fallback = make_mode(unpriced=Decimal(1000))  # $1000 per million tokens, in and out
    await openai_chat(app_for(fallback, seen), key, model="odd-model", max_tokens=1)
    assert seen[-1]["estimate"].amount == 2 * Decimal("0.001")
    status = await ledger.status("user:alice")
    assert status is not None
    assert status.spent == 2 * Decimal("0.001")
    explicit = make_mode(unpriced=ModelPrice(Decimal(0), Decimal(1)))
    await openai_chat(app_for(explicit, seen), key, model="odd-model", max_tokens=1)
    assert seen[-1]["estimate"].amount == MICRO


async def test_budget_denial_is_402_with_machine_readable_numbers(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    await ledger.set_budget("user:alice", limit=Decimal("0.00003"), period=Period("day"))
    app = app_for(make_mode())
    await openai_chat(app, key, max_tokens=10)  # holds 21 µUSD, charges 3 µUSD
    with pytest.raises(openai.APIStatusError) as denied:
        await openai_chat(app, key, max_tokens=20)  # needs 41 µUSD
    error = denied.value
    assert error.status_code == 402
    assert error.code == "budget_exceeded"
    assert error.type == "insufficient_quota"
    body = error.body
    assert isinstance(body, dict)
    assert body["scope"] == "user:alice"
    assert Decimal(body["limit"]) == Decimal("0.00003")
    assert Decimal(body["spent"]) == 3 * MICRO
    assert Decimal(body["held"]) == 0
    assert Decimal(body["remaining"]) == 27 * MICRO
    if not isinstance(ledger, FakeLedger):  # the fake has no periods
        assert datetime.fromisoformat(body["resets_at"]) > datetime.now(timezone.utc)
    with pytest.raises(anthropic.PaymentRequiredError) as an:
        await anthropic_message(app, key, max_tokens=20)
    assert an.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert an.value.body["error"]["scope"] == "user:alice"  # type: ignore[index]
    assert await ledger.holds() == []


async def test_team_and_key_budgets_are_held_atomically(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    key, record = await make_key("alice", team="red")
    await ledger.set_budget("team:red", limit=Decimal("0.00002"))
    client = client_for(app_for(make_mode()))
    denied = await client.post(
        "/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(key)
    )
    assert denied.status_code == 402
    assert denied.json()["error"]["scope"] == "team:red"
    await ledger.set_budget("team:red", limit=Decimal(1))
    await ledger.set_budget(f"key:{record.key_id}", limit=Decimal("0.0001"))
    ok = await client.post("/v1/chat/completions", json=chat(max_tokens=10), headers=bearer(key))
    assert ok.status_code == 200
    assert ok.headers["x-gatewaykit-budget-scope"] == f"key:{record.key_id}"
    assert Decimal(ok.headers["x-gatewaykit-budget-remaining"]) == Decimal("0.0001") - 21 * MICRO
    for scope in ("team:red", "user:alice", f"key:{record.key_id}"):
        status = await ledger.status(scope)
        assert status is not None
        assert status.spent == 3 * MICRO, scope


async def test_master_key_requests_use_the_configured_team(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode]
) -> None:
    app = app_for(make_mode(teams={"bob": "blue"}))
    await openai_chat(app, MASTER_KEY, user="bob")
    status = await ledger.status("team:blue")
    assert status is not None
    assert status.spent == 3 * MICRO


async def test_ledger_outage_is_503(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey, ledger: Ledger
) -> None:
    if not isinstance(ledger, FakeLedger):
        pytest.skip("outage is simulated with the fake ledger")
    key, _ = await make_key("alice")
    app = app_for(make_mode(key_cache_ttl=0))
    ledger.down = True
    with pytest.raises(openai.InternalServerError) as down:
        await openai_chat(app, key)
    assert down.value.status_code == 503
    assert down.value.type == "api_error"
    ledger.down = False


async def test_precedence_401_400_403_429_404_402(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    upstreams = [
        Upstream("https://o.example/v1", provider="openai", models=frozenset({"gpt-test"}))
    ]
    client = client_for(app_for(make_mode(upstreams=upstreams, unpriced="allow")))
    strict = client_for(app_for(make_mode(upstreams=upstreams)))
    key, _ = await make_key("alice", rpm=1, allowed_models=("gpt-test", "gpt-gone"))

    async def status(c: httpx.AsyncClient, body: Any, headers: dict[str, str]) -> int:
        if isinstance(body, bytes):
            r = await c.post("/v1/chat/completions", content=body, headers=headers)
        else:
            r = await c.post("/v1/chat/completions", json=body, headers=headers)
        return r.status_code

    # 401 beats a broken body, a missing model and an oversized body
    assert await status(client, b"{not json", bearer("bad")) == 401
    assert await status(client, {"messages": []}, {}) == 401
    assert await status(client, b"{not json", bearer(key)) == 400
    # 400 (unpriced) beats 403 (other user, model not allowed)
    assert await status(strict, chat(model="gpt-unpriced", user="bob"), bearer(key)) == 400
    # 403 beats 429: use up the one request per minute first
    assert await status(client, chat(), bearer(key)) == 200
    assert await status(client, chat(user="bob"), bearer(key)) == 403
    # 429 beats 404
    assert await status(client, chat(model="gpt-gone"), bearer(key)) == 429
    # 404 beats 402
    await ledger.set_budget("user:alice", limit=Decimal(0))
    key2, _ = await make_key("alice")
    assert await status(client, chat(model="gpt-nowhere"), bearer(key2)) == 404
    assert await status(client, chat(), bearer(key2)) == 402


async def test_the_in_flight_cap_is_decided_in_the_reserve_after_404_before_402(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    """docs/errors.md: the max_concurrent 429 is the reserve's, so a 404 comes first."""
    if isinstance(ledger, FakeLedger):
        pytest.skip("the fake ledger does not cap holds")
    upstreams = [
        Upstream("https://o.example/v1", provider="openai", models=frozenset({"gpt-test"}))
    ]
    client = client_for(app_for(make_mode(upstreams=upstreams, unpriced="allow")))
    key, record = await make_key("alice", max_concurrent=1)
    await ledger.reserve("in-flight", [f"key:{record.key_id}", "user:alice"], Decimal(0), ttl=60)

    async def status(model: str) -> int:
        r = await client.post("/v1/chat/completions", json=chat(model=model), headers=bearer(key))
        return r.status_code

    assert await status("gpt-nowhere") == 404
    assert await status("gpt-test") == 429
    await ledger.set_budget("user:alice", limit=Decimal(0))
    assert await status("gpt-test") == 429  # checked before the budgets, in the same step
    await ledger.release("in-flight")
    assert await status("gpt-test") == 402


async def test_request_id_is_ours_and_on_every_gated_response(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    key, _ = await make_key("alice")
    client = client_for(app_for(make_mode()))
    forged = {"x-request-id": "attacker-chosen", **bearer(key)}
    ok = await client.post("/v1/chat/completions", json=chat(), headers=forged)
    assert ok.headers["x-request-id"].startswith("req_")
    assert await ledger.get_hold("attacker-chosen") is None
    assert await ledger.get_hold(ok.headers["x-request-id"]) is not None
    bad = await client.post("/v1/chat/completions", json=chat(), headers=bearer("nope"))
    assert bad.headers["x-request-id"].startswith("req_")


async def test_no_key_material_in_logs_reprs_or_error_bodies(
    caplog: pytest.LogCaptureFixture,
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    caplog.set_level(logging.DEBUG)
    key, record = await make_key("alice", rpm=1)
    secret = key.split("_", 2)[2]  # gk_<id>_<secret>; the secret itself may hold "_"
    mode = make_mode()
    client = client_for(app_for(mode))
    bodies = []
    for headers in (bearer(key), bearer(key), bearer(key[:-1] + "Z"), bearer(MASTER_KEY)):
        response = await client.post("/v1/chat/completions", json=chat(user="bob"), headers=headers)
        bodies.append(response.text + str(response.headers))
    await ledger.set_budget("user:alice", limit=Decimal(0))
    mode.invalidate_key()
    response = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    bodies.append(response.text)
    reprs = [repr(mode), repr(record), repr(await ledger.usage())]
    for text in [caplog.text, *bodies, *reprs]:
        for material in (key, secret, MASTER_KEY, record.key_hash, "sk-upstream-secret"):
            assert material not in text


async def test_configuration_is_validated(ledger: Ledger) -> None:
    base: dict[str, Any] = {"prices": {}, "upstreams": []}
    for bad in (
        {"missing_usage": "guess"},
        {"disconnect": "ignore"},
        {"unpriced": "maybe"},
        {"unpriced": 0.5},
        {"hold_ttl": 0},
        {"master_key": "short"},
        {"default_rpm": 0},
        {"default_tpm": 0},
        {"rate_limits": [RateLimit("key:k1", rpm=1)]},
        {"rate_limits": ["user:alice"]},
        {"rate_limiter": object()},
        {"teams": {"bob": "red team"}},
        {"ledger_unavailable": "maybe"},
        {"over_budget": "squeeze"},
        {"min_output_tokens": 0},
        {"min_output_tokens": True},
        {"user_max_concurrent": 0},
        {"upstreams": Upstream("https://x.example/v1")},
        {"default_max_output_tokens": True},
        {"default_max_output_tokens": 1.5},
        {"default_max_output_tokens": -1},
        {"key_cache_ttl": -1},
        {"unknown_response_context": "guess"},
    ):
        with pytest.raises(ConfigurationError):
            StandaloneMode(ledger, **{**base, **bad})
    with pytest.raises(ConfigurationError):
        StandaloneMode(object(), **base)  # type: ignore[arg-type]


async def test_repr_does_not_leak(ledger: Ledger) -> None:
    mode = StandaloneMode(ledger, prices={}, upstreams=[], master_key=MASTER_KEY)
    assert MASTER_KEY not in repr(mode)
    assert "master_key=set" in repr(mode)
    assert dataclasses.is_dataclass(Upstream)


async def test_every_serving_upstream_is_an_attempt_in_order(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey
) -> None:
    key, _ = await make_key("alice")
    upstreams = [
        Upstream("https://a.example/v1", provider="openai", models=frozenset({"other"})),
        Upstream("https://b.example/v1", provider="openai", name="primary"),
        Upstream("https://c.example", provider="anthropic"),
        Upstream("https://d.example/v1", provider="openai", name="backup"),
    ]
    seen: Seen = []
    await openai_chat(app_for(make_mode(upstreams=upstreams), seen), key)
    attempts = seen[0]["attempts"]
    assert [(a.attempt_id, a.upstream.label, a.model) for a in attempts] == [
        ("1", "primary", "gpt-test"),
        ("2", "backup", "gpt-test"),
    ]


async def test_fail_open_admits_known_keys_without_a_hold_and_books_later(
    make_mode: Callable[..., StandaloneMode],
    make_key: MakeKey,
    ledger: Ledger,
    client_for: Callable[[ASGIApp], httpx.AsyncClient],
) -> None:
    if not isinstance(ledger, FakeLedger):
        pytest.skip("outage is simulated with the fake ledger")
    key, _ = await make_key("alice")
    clock = [0.0]
    mode = make_mode(ledger_unavailable="fail_open", key_cache_ttl=1, clock=lambda: clock[0])
    recover = [False]
    outcomes: list[Any] = []

    async def endpoint(request: Request) -> Response:
        settlement = get_settlement(request)
        if recover[0]:
            ledger.down = False
        outcomes.append(await settlement.on_success(Usage(10, 5)))
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])],
        middleware=[Middleware(GatewayMiddleware, mode=mode, heartbeat_interval=None)],
    )
    client = client_for(app)
    assert (
        await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    ).status_code == 200
    clock[0] += 10  # the cached key is stale now
    ledger.down = True
    # still down when it settles: served, nothing recorded, nothing broken
    served = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert served.status_code == 200
    assert "x-gatewaykit-budget-remaining" not in served.headers
    assert outcomes[-1].error == "settlement not recorded: LedgerUnavailableError"
    # an unknown key is never admitted
    unknown = await client.post("/v1/chat/completions", json=chat(), headers=bearer("gk_x_y"))
    assert unknown.status_code == 503
    # back before it settles: the charge is booked as a zero hold settled with an overrun
    recover[0] = True
    booked = await client.post("/v1/chat/completions", json=chat(), headers=bearer(key))
    assert booked.status_code == 200
    assert outcomes[-1].charged == 20 * MICRO
    hold = await ledger.get_hold(booked.headers["x-request-id"])
    assert hold is not None
    assert (hold.amount, hold.charged, hold.overrun) == (Decimal(0), 20 * MICRO, 20 * MICRO)
    status = await ledger.status("user:alice")
    assert status is not None
    assert status.spent == 2 * 20 * MICRO


OPENAI_TYPES = {
    401: ("invalid_request_error", "invalid_api_key"),
    400: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
    403: ("permission_error", "permission_denied"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    404: ("not_found_error", "model_not_found"),
    402: ("insufficient_quota", "budget_exceeded"),
    503: ("api_error", "service_unavailable"),
}
ANTHROPIC_TYPES = {
    401: "authentication_error",
    400: "invalid_request_error",
    413: "request_too_large",
    403: "permission_error",
    429: "rate_limit_error",
    404: "not_found_error",
    402: "billing_error",
    503: "api_error",
}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/responses"])
async def test_every_refusal_in_the_endpoints_own_envelope(
    ledger: Ledger, make_key: MakeKey, path: str
) -> None:
    if not isinstance(ledger, FakeLedger):
        pytest.skip("the 503 is simulated with the fake ledger")
    key, _ = await make_key("alice", rpm=1)
    broke, _ = await make_key("broke")
    await ledger.set_budget("user:broke", limit=Decimal(0))
    upstreams = [
        Upstream("https://o.example/v1", provider="openai", models=frozenset({"gpt-test"})),
        Upstream("https://a.example", provider="anthropic", models=frozenset({"claude-test"})),
    ]
    mode = StandaloneMode(
        ledger, prices=PRICES, upstreams=upstreams, unpriced="allow", key_cache_ttl=0
    )
    app = Starlette(
        routes=[Route(path, lambda r: JSONResponse({}), methods=["POST"])],
        middleware=[Middleware(GatewayMiddleware, mode=mode, max_body_bytes=2000)],
    )
    model = "claude-test" if path == "/v1/messages" else "gpt-test"
    base = messages() if path == "/v1/messages" else chat()
    if path == "/v1/responses":
        base = {"model": model, "input": "hi"}
    base["model"] = model
    user_field: dict[str, Any] = (
        {"metadata": {"user_id": "bob"}} if path == "/v1/messages" else {"user": "bob"}
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def post(body: Any, token: str, raw: bytes | None = None) -> httpx.Response:
            headers = bearer(token)
            if raw is not None:
                return await client.post(path, content=raw, headers=headers)
            return await client.post(path, json=body, headers=headers)

        answers = {
            401: await post(base, "gk_nope_nope"),
            400: await post(None, key, raw=b"{"),
            413: await post({**base, "pad": "x" * 3000}, key),
            403: await post({**base, **user_field}, key),
            200: await post(base, key),
            429: await post(base, key),
            404: await post({**base, "model": "nowhere"}, broke),
            402: await post(base, broke),
        }
        ledger.down = True
        answers[503] = await post(base, key)
        ledger.down = False
    assert answers.pop(200).status_code == 200
    for status, response in answers.items():
        assert response.status_code == status, (status, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"].startswith("req_")
        body = response.json()
        if path == "/v1/messages":
            assert body["type"] == "error"
            assert set(body["error"]) >= {"type", "message"}
            assert body["error"]["type"] == ANTHROPIC_TYPES[status]
        else:
            assert set(body) == {"error"}
            assert set(body["error"]) >= {"message", "type", "param", "code"}
            assert (body["error"]["type"], body["error"]["code"]) == OPENAI_TYPES[status]
    assert answers[429].headers["retry-after"]


@contextlib.asynccontextmanager
async def _gateway_and_cli(backend: str, tmp_path: Path) -> AsyncIterator[tuple[Ledger, Ledger]]:
    """Two ledger instances on one store: the running gateway's, and one such as the
    CLI opens (its own connection, as from another process)."""
    if backend == "sqlite":
        from gatewaykit.ledger.sqlite import SQLiteLedger

        path = str(tmp_path / "gateway.db")
        async with SQLiteLedger(path) as gateway, SQLiteLedger(path) as cli:
            yield gateway, cli
        return
    from gatewaykit.ledger.postgres import PostgresLedger
    from tests.ledger.backend_postgres import DSN, fresh_schema

    async with (
        fresh_schema("gk_mw") as schema,
        PostgresLedger(DSN, schema=schema, pool_max=2) as gateway,
        PostgresLedger(DSN, schema=schema, pool_max=2) as cli,
    ):
        yield gateway, cli


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_a_revocation_by_another_ledger_instance_reaches_a_running_gateway(
    backend: str, tmp_path: Path, client_for: Callable[[ASGIApp], httpx.AsyncClient]
) -> None:
    """The issue: a running gateway served a key revoked by the CLI for up to
    key_cache_ttl. With the ledger's key_epoch the window no longer depends on it."""
    async with _gateway_and_cli(backend, tmp_path) as (gateway, cli):
        mode = StandaloneMode(gateway, prices=PRICES, upstreams=UPSTREAMS, key_cache_ttl=3600)
        client = client_for(app_for(mode))
        new = generate_key()
        await cli.create_key(
            ApiKeyRecord(key_id=new.key_id, key_hash=new.key_hash, prefix=new.prefix, user="al")
        )
        served = await client.post("/v1/chat/completions", json=chat(), headers=bearer(new.key))
        assert served.status_code == 200  # looked up and cached for an hour
        assert await cli.revoke_key(new.key_id)
        revoked_at = time.perf_counter()
        while True:
            response = await client.post(
                "/v1/chat/completions", json=chat(), headers=bearer(new.key)
            )
            if response.status_code == 401:
                break
            assert response.status_code == 200
            assert time.perf_counter() - revoked_at < 10, "the revocation never arrived"
            await anyio.sleep(0.002)
        assert "revoked" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "error",
    [SchemaError("the ledger's schema is newer"), HoldConflictError("replayed"), LedgerError("x")],
)
async def test_any_ledger_error_while_admitting_is_503_in_the_envelope(
    make_mode: Callable[..., StandaloneMode], make_key: MakeKey, ledger: Ledger, error: Exception
) -> None:
    """Only 'unavailable' was mapped; any other LedgerError was Starlette's bare 500."""
    if not isinstance(ledger, FakeLedger):
        pytest.skip("the failure is injected into the fake ledger")
    key, _ = await make_key("alice")
    app = app_for(make_mode())

    async def failing(*args: object, **kwargs: object) -> object:
        raise error

    ledger.reserve = failing  # type: ignore[method-assign, assignment]
    with pytest.raises(openai.InternalServerError) as refused:
        await openai_chat(app, key)
    assert refused.value.status_code == 503
    assert refused.value.type == "api_error"
