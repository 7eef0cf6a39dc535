"""Hostile and broken inputs through the real stack: every refusal is in the endpoint's
own envelope, nothing is held or charged, and precedence is 401 > 400 > 403 > 429 > 404 > 402."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import pytest

from gatewaykit.ledger.base import Period
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.pricing import estimate_cost
from tests.asgi import call
from tests.scenarios.conftest import MASTER, PRICE, Build, new_key, spent

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], **extra}


async def post(app: Any, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        return await http.post(
            path, content=content, headers={"content-type": "application/json", **headers}
        )


def openai_error(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    return error  # type: ignore[no-any-return]


def anthropic_error(response: httpx.Response) -> dict[str, Any]:
    data = response.json()
    assert data["type"] == "error", data
    assert set(data["error"]) >= {"type", "message"}
    return data["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2]",
        b'"a string"',
        b"null",
        json.dumps({"messages": []}).encode(),
        json.dumps(chat_body(model=42)).encode(),
        json.dumps(chat_body(model=" ")).encode(),
        json.dumps(chat_body(stream="yes")).encode(),
        json.dumps(chat_body(max_tokens=-1)).encode(),
        json.dumps(chat_body(max_tokens=1.5)).encode(),
        json.dumps(chat_body(max_tokens=True)).encode(),
        json.dumps(chat_body(messages="hi")).encode(),
        json.dumps(chat_body(user=["bob"])).encode(),
    ],
)
async def test_unusable_bodies_are_400_in_the_openai_envelope(
    build: Build, ledger: SQLiteLedger, body: bytes
) -> None:
    key, _ = await new_key(ledger)
    response = await post(build(), CHAT, body, {"authorization": f"Bearer {key}"})
    assert response.status_code == 400, response.text
    assert openai_error(response)["type"] == "invalid_request_error"
    assert await ledger.usage() == []


async def test_anthropic_bad_body_is_400_in_the_anthropic_envelope(
    build: Build, ledger: SQLiteLedger
) -> None:
    key, _ = await new_key(ledger)
    response = await post(build(), MESSAGES, b"[]", {"x-api-key": key})
    assert response.status_code == 400
    assert anthropic_error(response)["type"] == "invalid_request_error"


@pytest.mark.parametrize("max_tokens", [10**12, 10**30])
async def test_absurd_max_tokens_is_refused_cleanly_not_a_500(
    build: Build, ledger: SQLiteLedger, max_tokens: int
) -> None:
    """An output cap whose worst case no ledger can hold is a client error (400 or 402),
    in the envelope, never an unhandled exception (500 without an SDK-readable body)."""
    key, _ = await new_key(ledger)
    await ledger.set_budget("user:alice", limit=Decimal(5))
    response = await post(
        build(), CHAT, chat_body(max_tokens=max_tokens), {"authorization": f"Bearer {key}"}
    )
    assert response.status_code in (400, 402), response.text
    openai_error(response)
    assert await spent(ledger) == 0


async def test_absurd_max_tokens_without_any_budget_is_not_a_500(
    build: Build, ledger: SQLiteLedger
) -> None:
    key, _ = await new_key(ledger)
    response = await post(
        build(), CHAT, chat_body(max_tokens=10**30), {"authorization": f"Bearer {key}"}
    )
    assert response.status_code == 400, response.text
    openai_error(response)


async def test_ten_megabyte_body_is_413_before_it_is_all_read(
    build: Build, ledger: SQLiteLedger
) -> None:
    key, _ = await new_key(ledger)
    chunk = b"x" * (1024 * 1024)
    chunks = [b'{"model": "test-model", "messages": [{"role": "user", "content": "'] + [chunk] * 10
    ex = await call(build(), CHAT, body=chunks, headers={"authorization": f"Bearer {key}"})
    assert ex.status == 413
    assert ex.json()["error"]["type"] == "invalid_request_error"
    assert ex.receive_calls <= 6  # stopped at the 4 MiB limit, not after 10 MiB
    # Declared up front: refused without reading a byte of the body.
    ex = await call(
        build(),
        CHAT,
        body=[b"{}"],
        headers={"authorization": f"Bearer {key}", "content-length": str(10 * 2**20)},
    )
    assert ex.status == 413


async def test_a_bad_key_outranks_a_huge_body(build: Build, ledger: SQLiteLedger) -> None:
    ex = await call(
        build(),
        CHAT,
        body=[b"{}"],
        headers={"authorization": "Bearer nope", "content-length": str(10 * 2**20)},
    )
    assert ex.status == 401


async def test_unicode_heavy_prompt_is_estimated_at_least_per_character(
    build: Build, ledger: SQLiteLedger
) -> None:
    """A CJK/emoji prompt is held for at least one token per four characters, counted in
    characters (not UTF-8 bytes, not zero)."""
    key, _ = await new_key(ledger)
    prompt = "漢字🙂😀" * 2000  # 8000 characters (each emoji is one code point)
    need = estimate_cost(PRICE, prompt_tokens=2000, max_output_tokens=10)
    await ledger.set_budget("user:alice", limit=need - Decimal("0.000000001"))
    body = chat_body(messages=[{"role": "user", "content": prompt}], max_tokens=10)
    response = await post(build(), CHAT, body, {"authorization": f"Bearer {key}"})
    assert response.status_code == 402
    details = openai_error(response)
    assert details["code"] == "budget_exceeded"
    await ledger.set_budget("user:alice", limit=need)
    response = await post(build(), CHAT, body, {"authorization": f"Bearer {key}"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        {},
        {"authorization": "Bearer "},
        {"authorization": "Basic Zm9vOmJhcg=="},
        {"authorization": "Bearer sk-openai-looking-key"},
        {"authorization": "Bearer gk-short"},
        {"x-api-key": "gk-" + "a" * 200},
    ],
)
async def test_bad_credentials_are_401(
    build: Build, ledger: SQLiteLedger, header: dict[str, str]
) -> None:
    await new_key(ledger)
    response = await post(build(), CHAT, chat_body(), header)
    assert response.status_code == 401
    assert openai_error(response)["code"] == "invalid_api_key"
    response = await post(build(), MESSAGES, _messages_body(), header)
    assert response.status_code == 401
    assert anthropic_error(response)["type"] == "authentication_error"


def _messages_body(**extra: Any) -> dict[str, Any]:
    return {
        "model": "test-model",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        **extra,
    }


async def test_key_with_one_character_changed_is_401(build: Build, ledger: SQLiteLedger) -> None:
    key, _ = await new_key(ledger)
    tampered = key[:-1] + ("a" if key[-1] != "a" else "b")
    response = await post(build(), CHAT, chat_body(), {"authorization": f"Bearer {tampered}"})
    assert response.status_code == 401


async def test_revoked_and_expired_keys_are_401(build: Build, ledger: SQLiteLedger) -> None:
    revoked, record = await new_key(ledger)
    app = build(key_cache_ttl=0)
    assert (await post(app, CHAT, chat_body(), {"authorization": f"Bearer {revoked}"})).is_success
    await ledger.revoke_key(record.key_id)
    response = await post(app, CHAT, chat_body(), {"authorization": f"Bearer {revoked}"})
    assert response.status_code == 401
    assert "revoked" in openai_error(response)["message"]
    expired, _ = await new_key(ledger, expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    response = await post(app, MESSAGES, _messages_body(), {"x-api-key": expired})
    assert response.status_code == 401
    assert "expired" in anthropic_error(response)["message"]


async def test_master_key_must_name_a_user(build: Build, ledger: SQLiteLedger) -> None:
    response = await post(build(), CHAT, chat_body(), {"authorization": f"Bearer {MASTER}"})
    assert response.status_code == 400
    response = await post(
        build(), CHAT, chat_body(user="bob"), {"authorization": f"Bearer {MASTER}"}
    )
    assert response.status_code == 200
    assert await spent(ledger, "user:bob") > 0


async def test_ordinary_key_naming_another_user_is_403(build: Build, ledger: SQLiteLedger) -> None:
    key, _ = await new_key(ledger)
    await ledger.set_budget("user:bob", limit=Decimal(1))
    response = await post(build(), CHAT, chat_body(user="bob"), {"authorization": f"Bearer {key}"})
    assert response.status_code == 403
    assert openai_error(response)["type"] == "permission_error"
    response = await post(
        build(), MESSAGES, _messages_body(metadata={"user_id": "bob"}), {"x-api-key": key}
    )
    assert response.status_code == 403
    assert anthropic_error(response)["type"] == "permission_error"
    assert await spent(ledger, "user:bob") == 0


async def test_anthropic_accepts_x_api_key_and_bearer(build: Build, ledger: SQLiteLedger) -> None:
    key, _ = await new_key(ledger)
    app = build()
    assert (await post(app, MESSAGES, _messages_body(), {"x-api-key": key})).status_code == 200
    response = await post(app, MESSAGES, _messages_body(), {"authorization": f"Bearer {key}"})
    assert response.status_code == 200


async def test_precedence_401_400_403_429_404_402(build: Build, ledger: SQLiteLedger) -> None:
    """Each step removes the highest-ranked fault; the next one shows."""
    key, record = await new_key(ledger, rpm=1, allowed_models=("test-model", "ghost-model"))
    await ledger.set_budget(f"key:{record.key_id}", limit=Decimal("0.000000001"))
    app = build(unpriced="allow", models=frozenset({"test-model"}))
    bearer = {"authorization": f"Bearer {key}"}
    everything_wrong = chat_body(model="forbidden-model", user="bob")
    assert (await post(app, CHAT, b"[", {"authorization": "Bearer x"})).status_code == 401
    assert (await post(app, CHAT, b"[", bearer)).status_code == 400
    assert (await post(app, CHAT, everything_wrong, bearer)).status_code == 403
    # The key's one request per minute: a 403 did not spend it.
    first = await post(app, CHAT, chat_body(model="ghost-model"), bearer)
    assert first.status_code == 404
    limited = await post(app, CHAT, chat_body(model="ghost-model"), bearer)
    assert limited.status_code == 429
    assert limited.headers["retry-after"]
    fresh, fresh_record = await new_key(ledger)
    await ledger.set_budget(f"key:{fresh_record.key_id}", limit=Decimal("0.000000001"))
    response = await post(app, CHAT, chat_body(), {"authorization": f"Bearer {fresh}"})
    assert response.status_code == 402
    error = openai_error(response)
    assert (error["type"], error["code"]) == ("insufficient_quota", "budget_exceeded")
    assert await ledger.usage() == []


async def test_budget_denial_is_machine_readable(build: Build, ledger: SQLiteLedger) -> None:
    key, _ = await new_key(ledger)
    await ledger.set_budget("user:alice", limit=Decimal("0.0001"), period=Period("day"))
    response = await post(build(), CHAT, chat_body(), {"authorization": f"Bearer {key}"})
    assert response.status_code == 402
    body = response.json()["error"]
    details = {k: body[k] for k in ("scope", "limit", "spent", "held", "remaining", "resets_at")}
    assert details["scope"] == "user:alice"
    assert Decimal(details["limit"]) == Decimal("0.0001")
    assert Decimal(details["spent"]) == 0 == Decimal(details["held"])
    assert Decimal(details["remaining"]) == Decimal("0.0001")
    assert datetime.fromisoformat(details["resets_at"]) > datetime.now(timezone.utc)


async def test_n_completions_are_held_for_n_times_the_output(
    build: Build, ledger: SQLiteLedger
) -> None:
    """``n`` completions may each use the whole output cap: holding for one would let a
    request overrun its budget n-fold (and n concurrent ones be admitted on 1/n of it)."""
    key, _ = await new_key(ledger)
    await ledger.set_budget("user:alice", limit=Decimal("0.005"))
    bearer = {"authorization": f"Bearer {key}"}
    one = await post(build(), CHAT, chat_body(max_tokens=100), bearer)
    assert one.status_code == 200
    many = await post(build(), CHAT, chat_body(max_tokens=100, n=50), bearer)
    assert many.status_code == 402
    details = openai_error(many)
    assert Decimal(str(many.json()["error"]["requested"])) == estimate_cost(
        PRICE, prompt_tokens=1, max_output_tokens=5000
    )
    assert details["code"] == "budget_exceeded"
    for bad in (0, -1, "2", 1.5):
        response = await post(build(), CHAT, chat_body(n=bad), bearer)
        assert response.status_code == 400


@pytest.mark.parametrize(
    ("path", "extra"),
    [
        (CHAT, {"functions": [{"name": "f", "description": "d" * 40_000}]}),
        (CHAT, {"prediction": {"type": "content", "content": "p" * 40_000}}),
        (
            "/v1/responses",
            {"text": {"format": {"type": "json_schema", "schema": {"d": "s" * 40_000}}}},
        ),
    ],
    ids=["legacy-functions", "prediction", "responses-schema"],
)
async def test_prompt_text_outside_messages_is_held_for(
    build: Build, ledger: SQLiteLedger, path: str, extra: dict[str, Any]
) -> None:
    """Text the provider reads and bills, wherever it sits, counts in the estimate: else a
    burst of such requests is admitted on holds far below what they will cost."""
    key, _ = await new_key(ledger)
    await ledger.set_budget("user:alice", limit=Decimal("0.005"))  # < 10,000 prompt tokens
    body: dict[str, Any] = {"model": "test-model", **extra}
    if path == CHAT:
        body.update(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    else:
        body.update(input="hi", max_output_tokens=1)
    bearer = {"authorization": f"Bearer {key}"}
    response = await post(build(), path, body, bearer)
    assert response.status_code == 402
    small = {k: v for k, v in body.items() if k not in extra}
    assert (await post(build(), path, small, bearer)).status_code == 200


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions/"),
        ("POST", "/V1/chat/completions"),
        ("POST", "//v1/chat/completions"),
        ("POST", "/v1/chat/completions%2F"),
        ("PUT", "/v1/chat/completions"),
        ("GET", "/v1/messages"),
    ],
)
async def test_path_and_method_variants_never_reach_the_upstream_ungated(
    build: Build, ledger: SQLiteLedger, provider: tuple[Any, str], method: str, path: str
) -> None:
    fake, _ = provider
    key, _ = await new_key(ledger)
    transport = httpx.ASGITransport(app=build(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        response = await http.request(
            method,
            path,
            json=chat_body(stream=False),
            headers={"authorization": f"Bearer {key}"},
            follow_redirects=False,
        )
    assert not response.is_success
    assert fake.requests == []


@pytest.mark.parametrize("where", ["body", "tools"])
async def test_deeply_nested_json_is_400_not_a_500(
    build: Build, ledger: SQLiteLedger, where: str
) -> None:
    key, _ = await new_key(ledger)
    depth = 100_000
    if where == "body":
        raw = b"[" * depth + b"]" * depth
    else:
        nested = "[" * 20_000 + "]" * 20_000
        raw = ('{"model": "test-model", "messages": [], "tools": ' + nested + "}").encode()
    response = await post(build(), CHAT, raw, {"authorization": f"Bearer {key}"})
    assert response.status_code == 400, response.text
    assert openai_error(response)["type"] == "invalid_request_error"
