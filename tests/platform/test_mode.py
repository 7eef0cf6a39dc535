"""PlatformMode through GatewayMiddleware: resolve, status relaying, and reports."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gatewaykit.context import get_context
from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError, RequestRejected
from gatewaykit.middleware import GatewayMiddleware
from gatewaykit.modes.base import GatewayRequest, RequestModeStrategy
from gatewaykit.modes.platform import ATTEMPT_ID_HEADER, PlatformMode, PlatformSettlement
from gatewaykit.outbox import RetryPolicy, SQLiteOutbox
from gatewaykit.parsing import ParsedRequest
from gatewaykit.pricing import ModelPrice, PriceTable
from gatewaykit.testing import FakeControlPlane
from gatewaykit.usage import Usage, UsageSource

from .conftest import GATEWAY_TOKEN, until

pytestmark = pytest.mark.anyio

OPENAI_UP = {"provider": "openai", "base_url": "https://up-a.test/v1", "api_key": "sk-up-a"}
ANTHROPIC_UP = {
    "provider": "anthropic",
    "base_url": "https://up-b.test",
    "api_key": "sk-up-b",
    "headers": {"anthropic-beta": "x"},
}
PRICES = PriceTable({"gpt-4o-mini": ModelPrice(Decimal("0.15"), Decimal("0.60"))})

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def chat_body(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "x" * 40}], **extra}


def messages_body(model: str = "claude-haiku-4-5") -> dict[str, Any]:
    return {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


class Handler:
    """A stand-in endpoint: records the context, then settles as the test says."""

    def __init__(self) -> None:
        self.contexts: list[Any] = []
        self.serve_attempt: int | None = None
        self.usage: Usage | None = Usage(input_tokens=12, output_tokens=7)

    async def endpoint(self, request: Request) -> JSONResponse:
        context = get_context(request)
        self.contexts.append(context)
        if self.serve_attempt is not None:  # what an adapter does when it falls back
            context.settlement.note_attempt(context.attempts[self.serve_attempt])
        if self.usage is not None:
            await context.settlement.on_success(self.usage)
        return JSONResponse({"ok": True})


@pytest.fixture
def plane() -> FakeControlPlane:
    plane = FakeControlPlane(gateway_token=GATEWAY_TOKEN)
    plane.add_user("tok-alice", user_id="alice")
    plane.set_attempts("gpt-4o-mini", OPENAI_UP, {**OPENAI_UP, "base_url": "https://up-c.test/v1"})
    plane.set_attempts("claude-haiku-4-5", ANTHROPIC_UP)
    return plane


@pytest.fixture
async def plane_client(plane: FakeControlPlane) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=plane.app)
    async with httpx.AsyncClient(transport=transport) as client:
        yield client


@pytest.fixture
async def mode(plane_client: httpx.AsyncClient, tmp_path: Path) -> AsyncIterator[PlatformMode]:
    mode = PlatformMode(
        base_url="http://plane.test",
        gateway_token=GATEWAY_TOKEN,
        client=plane_client,
        outbox=SQLiteOutbox(str(tmp_path / "outbox.db")),
        prices=PRICES,
        resolve_timeout=0.5,
        retry=RetryPolicy(initial_delay=0.02, max_delay=0.1),
    )
    async with mode:
        yield mode


@pytest.fixture
def handler() -> Handler:
    return Handler()


@pytest.fixture
async def gateway(mode: PlatformMode, handler: Handler) -> AsyncIterator[httpx.AsyncClient]:
    app = Starlette(
        routes=[Route(path, handler.endpoint, methods=["POST"]) for path in (CHAT, MESSAGES)]
    )
    gated = GatewayMiddleware(app, mode=mode)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gated), base_url="http://gw.test"
    ) as client:
        yield client


async def delivered(mode: PlatformMode, plane: FakeControlPlane, count: int) -> None:
    mode.sender.notify()
    await until(lambda: len(plane.reports) >= count)

    async def acknowledged() -> bool:
        return await mode.outbox.size() == 0

    await until(acknowledged)


async def test_resolve_builds_the_context_and_reports_success(
    gateway: httpx.AsyncClient, plane: FakeControlPlane, mode: PlatformMode, handler: Handler
) -> None:
    assert isinstance(mode, RequestModeStrategy)
    response = await gateway.post(
        CHAT, json=chat_body(max_tokens=1000), headers={"authorization": "Bearer tok-alice"}
    )
    assert response.status_code == 200
    [context] = handler.contexts
    request_id = context.request_id
    assert response.headers["x-request-id"] == request_id
    assert context.user_id == "alice"
    assert [a.upstream.base_url for a in context.attempts] == [
        "https://up-a.test/v1",
        "https://up-c.test/v1",
    ]
    first = context.attempts[0]
    assert (first.upstream.provider, first.upstream.api_key, first.model) == (
        "openai",
        "sk-up-a",
        "gpt-4o-mini",
    )
    assert "sk-up-a" not in repr(context.attempts)
    assert response.headers[ATTEMPT_ID_HEADER] == first.attempt_id
    [call] = plane.resolve_calls
    # 40 chars → 10 prompt tokens at $0.15/M + 1000 output tokens at $0.60/M.
    assert call == {
        "request_id": request_id,
        "user_token": "tok-alice",
        "model": "gpt-4o-mini",
        "endpoint": "chat.completions",
        "estimate_usd": "0.0006015",
    }
    await delivered(mode, plane, 1)
    key = f"{request_id}:{first.attempt_id}"
    assert plane.reports[key] == {
        "request_id": request_id,
        "attempt_id": first.attempt_id,
        "status": "success",
        "usage": {
            "input_tokens": 12,
            "output_tokens": 7,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
        },
        "usage_source": "provider",
        "observed": {
            "upstream_contacted": False,
            "committed": False,
            "output_chars": 0,
            "prompt_tokens_estimate": 10,
        },
    }
    assert await mode.outbox.size() == 0


async def test_anthropic_token_in_x_api_key_and_unpriced_estimate_is_zero(
    gateway: httpx.AsyncClient, plane: FakeControlPlane, handler: Handler
) -> None:
    response = await gateway.post(
        MESSAGES, json=messages_body(), headers={"x-api-key": "tok-alice"}
    )
    assert response.status_code == 200
    [call] = plane.resolve_calls
    assert call["endpoint"] == "messages"
    assert call["estimate_usd"] == "0"
    [attempt] = handler.contexts[0].attempts
    assert attempt.upstream.provider == "anthropic"
    assert dict(attempt.upstream.headers) == {"anthropic-beta": "x"}


async def test_the_serving_attempt_is_reported_and_exposed(
    gateway: httpx.AsyncClient, plane: FakeControlPlane, mode: PlatformMode, handler: Handler
) -> None:
    handler.serve_attempt = 1
    response = await gateway.post(
        CHAT, json=chat_body(), headers={"authorization": "Bearer tok-alice"}
    )
    served = handler.contexts[0].attempts[1].attempt_id
    assert response.headers[ATTEMPT_ID_HEADER] == served
    await delivered(mode, plane, 1)
    [(key, report)] = plane.reports.items()
    assert report["attempt_id"] == served
    assert key.endswith(f":{served}")


# -- statuses ----------------------------------------------------------------------------

OPENAI_TYPES = {
    401: ("invalid_request_error", "invalid_api_key"),
    402: ("insufficient_quota", "budget_exceeded"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("api_error", "service_unavailable"),
}
ANTHROPIC_TYPES = {
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "api_error",
}


def configure(plane: FakeControlPlane, case: str) -> tuple[str, int]:
    """Make the control plane answer ``case``; returns (user token, expected status)."""
    plane.add_user("tok-poor", user_id="poor", budget_usd=Decimal(0))
    plane.add_user("tok-limited", user_id="lim", models=["other-model"])
    plane.add_user("tok-slow", user_id="slow", retry_after=17)
    if case == "unknown-token":
        return "tok-nobody", 401
    if case == "budget":
        return "tok-poor", 402
    if case == "forbidden-model":
        return "tok-limited", 403
    if case == "rate-limited":
        return "tok-slow", 429
    if case == "unknown-model":
        plane.attempts.clear()
        return "tok-alice", 404
    if case == "server-error":
        plane.resolve_status = 500
    elif case == "bad-request":
        plane.resolve_status = 400
    elif case == "unprocessable":
        plane.resolve_status = 422
    elif case == "malformed-json":
        plane.malformed_resolve = True
    elif case == "timeout":
        plane.resolve_delay = 1.0
    elif case == "down":
        plane.down = True
    elif case == "gateway-token-refused":
        plane.gateway_token = "rotated"
    elif case == "no-attempts":
        plane.set_attempts("gpt-4o-mini")
        plane.set_attempts("claude-haiku-4-5")
    elif case == "wrong-provider":
        plane.set_attempts("gpt-4o-mini", ANTHROPIC_UP)
        plane.set_attempts("claude-haiku-4-5", OPENAI_UP)
    elif case == "bad-base-url":
        plane.set_attempts("gpt-4o-mini", {**OPENAI_UP, "base_url": "ftp://x"})
        plane.set_attempts("claude-haiku-4-5", {**ANTHROPIC_UP, "base_url": "ftp://x"})
    else:
        raise AssertionError(case)
    return "tok-alice", 503


#: Resolve outcomes after which the gateway releases the request.
RELEASED = {
    "server-error",
    "malformed-json",
    "timeout",
    "down",
    "no-attempts",
    "wrong-provider",
    "bad-base-url",
}

CASES = [
    "unknown-token",
    "budget",
    "forbidden-model",
    "rate-limited",
    "unknown-model",
    "server-error",
    "bad-request",
    "unprocessable",
    "malformed-json",
    "timeout",
    "down",
    "gateway-token-refused",
    "no-attempts",
    "wrong-provider",
    "bad-base-url",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", [WireFormat.OPENAI_CHAT, WireFormat.ANTHROPIC_MESSAGES])
async def test_resolve_outcomes_in_the_endpoint_envelope(
    gateway: httpx.AsyncClient,
    plane: FakeControlPlane,
    mode: PlatformMode,
    handler: Handler,
    case: str,
    fmt: WireFormat,
) -> None:
    token, status = configure(plane, case)
    path, body = (CHAT, chat_body()) if fmt.is_openai else (MESSAGES, messages_body())
    response = await gateway.post(path, json=body, headers={"authorization": f"Bearer {token}"})
    assert response.status_code == status, response.text
    assert not handler.contexts  # the app never ran
    payload = response.json()
    if fmt.is_openai:
        assert (payload["error"]["type"], payload["error"]["code"]) == OPENAI_TYPES[status]
    else:
        assert payload["type"] == "error"
        assert payload["error"]["type"] == ANTHROPIC_TYPES[status]
    message = payload["error"]["message"]
    assert GATEWAY_TOKEN not in response.text
    assert "tok-" not in message
    if status == 429:
        assert response.headers["retry-after"] == "17"
    if status == 402:
        assert payload["error"]["scope"] == "user:poor"
        assert payload["error"]["remaining"] == "0"
    if status == 503:
        assert "control plane" in message
        assert "retry" in message
    if case == "timeout":
        assert "did not answer within 0.5s" in message
    # The outcomes that leave the gateway unsure whether the control plane admitted the
    # request are reported "released"; a refusal (or a rejected gateway token) is not.
    request_id = response.headers["x-request-id"]
    await restore(plane)
    await delivered(mode, plane, 1 if case in RELEASED else 0)
    assert plane.report_problems() == []
    if case in RELEASED:
        assert list(plane.reports) == [f"{request_id}:-"]
        [report] = plane.reports.values()
        assert report["status"] == "released"
        assert report["usage"] is None
        assert report["usage_source"] == "none"
        assert report["observed"]["upstream_contacted"] is False
        assert plane.unreported() == set()
    else:
        assert plane.reports == {}
        assert plane.admitted == {}


async def restore(plane: FakeControlPlane) -> None:
    """The control plane answers reports again (so the outbox can be drained)."""
    plane.down = False
    plane.gateway_token = GATEWAY_TOKEN


async def test_missing_credential_is_401_without_calling_the_control_plane(
    gateway: httpx.AsyncClient, plane: FakeControlPlane
) -> None:
    response = await gateway.post(CHAT, json=chat_body())
    assert response.status_code == 401
    assert "missing API key" in response.json()["error"]["message"]
    bad_body = await gateway.post(CHAT, content=b"{", headers={"content-type": "application/json"})
    assert bad_body.status_code == 401  # 401 outranks the 400 of a bad body
    assert plane.resolve_calls == []


async def test_unreachable_control_plane_is_503(tmp_path: Path) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(refuse)) as client:
        mode = PlatformMode(
            base_url="http://plane.test",
            gateway_token=GATEWAY_TOKEN,
            client=client,
            outbox=SQLiteOutbox(str(tmp_path / "o.db")),
        )
        app = GatewayMiddleware(Starlette(), mode=mode)
        async with (
            mode,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw.test"
            ) as gw,
        ):
            response = await gw.post(
                MESSAGES, json=messages_body(), headers={"x-api-key": "tok-alice"}
            )
            assert await mode.outbox.size() == 0  # never reached it: nothing to release
    assert response.status_code == 503
    assert response.json()["error"]["message"] == (
        "the control plane is unreachable (ConnectError); please retry shortly"
    )


# -- settlement --------------------------------------------------------------------------


def gateway_request(model: str = "gpt-4o-mini", request_id: str = "req_1") -> GatewayRequest:
    return GatewayRequest(
        request_id=request_id,
        path=CHAT,
        format=WireFormat.OPENAI_CHAT,
        headers={"authorization": "Bearer tok-alice"},
        body={},
        raw_body=b"{}",
        parsed=ParsedRequest(model=model, stream=True, prompt_chars=8),
    )


async def test_settlement_reports_each_terminal_kind(
    mode: PlatformMode, plane: FakeControlPlane
) -> None:
    outcomes = {}
    for n, kind in enumerate(["no_usage", "error_before", "error_after", "incomplete"]):
        context = await mode.resolve(gateway_request(request_id=f"req_{n}"))
        settlement = context.settlement
        assert isinstance(settlement, PlatformSettlement)
        if kind == "no_usage":
            outcome = await settlement.on_no_usage()
        elif kind == "error_before":
            outcome = await settlement.on_error(RuntimeError("upstream 500"))
        elif kind == "error_after":
            await settlement.on_first_chunk()
            settlement.note_output(40)
            settlement.note_usage(Usage(input_tokens=9, source=UsageSource.PARTIAL))
            outcome = await settlement.on_error("stream broke")
        else:
            settlement.note_upstream_contacted()
            outcome = await settlement.on_incomplete(Usage(3, 4, source=UsageSource.PARTIAL))
        again = await settlement.on_success(Usage(1, 1))  # the first terminal hook wins
        assert again is outcome
        assert outcome.charged == 0
        outcomes[kind] = (outcome, settlement.report_key)
    await delivered(mode, plane, 4)
    reports = {key: plane.reports[key] for _, key in outcomes.values() if key}
    by_kind = {kind: reports[key] for kind, (_, key) in outcomes.items() if key}
    assert by_kind["no_usage"]["status"] == "no_usage"
    assert by_kind["no_usage"]["usage"] is None
    assert by_kind["no_usage"]["usage_source"] == "none"
    assert by_kind["error_before"]["status"] == "error"
    assert by_kind["error_before"]["error"] == "RuntimeError: upstream 500"
    assert by_kind["error_before"]["usage"] is None
    assert outcomes["error_before"][0].refunded
    assert by_kind["error_after"]["usage"]["input_tokens"] == 9
    assert by_kind["error_after"]["usage_source"] == "partial"
    assert by_kind["error_after"]["observed"]["committed"] is True
    assert by_kind["error_after"]["observed"]["output_chars"] == 40
    assert not outcomes["error_after"][0].refunded
    assert by_kind["incomplete"]["status"] == "incomplete"
    assert by_kind["incomplete"]["usage"]["output_tokens"] == 4
    assert by_kind["incomplete"]["observed"]["upstream_contacted"] is True
    assert len(plane.usage_posts) == 4  # one report per request


async def test_mode_not_running_refuses_with_503(
    plane_client: httpx.AsyncClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mode = PlatformMode(
        base_url="http://plane.test",
        gateway_token=GATEWAY_TOKEN,
        client=plane_client,
        outbox=SQLiteOutbox(str(tmp_path / "o.db")),
    )
    with pytest.raises(RequestRejected) as caught:
        await mode.resolve(gateway_request())
    assert caught.value.status == 503
    assert "async with mode" in caplog.text


async def test_a_report_that_cannot_be_stored_is_logged_whole(
    mode: PlatformMode, caplog: pytest.LogCaptureFixture
) -> None:
    context = await mode.resolve(gateway_request())
    await mode.outbox.aclose()  # the store is gone
    outcome = await context.settlement.on_success(Usage(5, 6))
    assert outcome.status == "success"
    assert "could not store usage report" in caplog.text
    logged = caplog.text.split("report: ", 1)[1].splitlines()[0]
    assert json.loads(logged)["usage"]["output_tokens"] == 6
    await mode.outbox.open()


async def test_configuration_errors(plane_client: httpx.AsyncClient) -> None:
    outbox = SQLiteOutbox(":memory:")
    good: dict[str, Any] = {
        "base_url": "http://x",
        "gateway_token": "t",
        "client": plane_client,
        "outbox": outbox,
    }
    mode = PlatformMode(**good)
    priced = PlatformMode(**good, prices={"m": ModelPrice(Decimal(1), Decimal(2))})
    assert isinstance(priced.prices, PriceTable)
    assert "t" not in repr(mode).replace("http://x", "").replace("stopped", "").replace(
        "PlatformMode", ""
    )
    for bad in (
        {"base_url": "x"},
        {"gateway_token": ""},
        {"outbox": object()},
        {"resolve_timeout": 0},
        {"default_max_output_tokens": -1},
        {"prices": {"m": 1}},
    ):
        with pytest.raises(ConfigurationError):
            PlatformMode(**{**good, **bad})


async def test_a_control_plane_url_with_credentials_is_never_shown(
    plane_client: httpx.AsyncClient,
) -> None:
    outbox = SQLiteOutbox(":memory:")
    url = "https://gw:cppass@cp.example/?token=t0k"
    mode = PlatformMode(base_url=url, gateway_token="t", client=plane_client, outbox=outbox)
    for text in (repr(mode), repr(mode.sender)):
        assert "cppass" not in text
        assert "t0k" not in text
        assert "https://***@cp.example/?token=***" in text
    with pytest.raises(ConfigurationError) as info:
        PlatformMode(base_url="ftp://gw:cppass@cp", gateway_token="t", client=plane_client,
                     outbox=outbox)  # fmt: skip
    assert "cppass" not in str(info.value)


async def test_works_with_an_httpx2_client(plane: FakeControlPlane, tmp_path: Path) -> None:
    import httpx2

    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=plane.app)) as client:
        mode = PlatformMode(
            base_url="http://plane.test",
            gateway_token=GATEWAY_TOKEN,
            client=client,
            outbox=SQLiteOutbox(str(tmp_path / "o.db")),
        )
        async with mode:
            context = await mode.resolve(gateway_request())
            assert context.user_id == "alice"
            await context.settlement.on_success(Usage(2, 3))
            await delivered(mode, plane, 1)
            plane.add_user("tok-slow", user_id="slow", retry_after=9)
            slow = dataclasses.replace(gateway_request(), headers={"x-api-key": "tok-slow"})
            with pytest.raises(RequestRejected) as caught:
                await mode.resolve(slow)
            assert caught.value.status == 429
            assert caught.value.headers == {"retry-after": "9"}


async def test_the_client_is_told_which_field_was_wrong(
    gateway: httpx.AsyncClient, plane: FakeControlPlane
) -> None:
    plane.set_attempts("gpt-4o-mini", {**OPENAI_UP, "api_key": 12345, "provider": "openai"})
    response = await gateway.post(
        CHAT, json=chat_body(), headers={"authorization": "Bearer tok-alice"}
    )
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "malformed answer" in message
    assert "api_key: Input should be a valid string" in message
    assert "12345" not in message
