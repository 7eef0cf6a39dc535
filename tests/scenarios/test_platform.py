"""PlatformMode through the real stack: a control plane that is down at resolve is a 503
in the endpoint's envelope; reports made during an outage arrive later, once per request."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from gatewaykit import GatewayMiddleware
from gatewaykit.adapters import gateway_routes
from gatewaykit.modes.platform import PlatformMode
from gatewaykit.outbox import RetryPolicy, SQLiteOutbox
from gatewaykit.testing import FakeBehavior, FakeControlPlane, FakeProvider
from tests.asgi import Exchange, call
from tests.platform.conftest import until
from tests.scenarios.conftest import UPSTREAM_KEY

pytestmark = pytest.mark.anyio

GATEWAY_TOKEN = "gw-token-SECRET-777"
CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


@pytest.fixture
def plane(provider: tuple[FakeProvider, str]) -> FakeControlPlane:
    _, url = provider
    plane = FakeControlPlane(gateway_token=GATEWAY_TOKEN)
    plane.add_user("tok-alice", user_id="alice")
    plane.set_attempts(
        "*",
        {"provider": "openai", "base_url": f"{url}/v1", "api_key": UPSTREAM_KEY},
        {"provider": "anthropic", "base_url": url, "api_key": UPSTREAM_KEY},
    )
    return plane


@pytest.fixture
async def gateway(
    plane: FakeControlPlane, client: httpx.AsyncClient, tmp_path: Path
) -> AsyncIterator[tuple[Any, PlatformMode]]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plane.app)) as plane_http:
        mode = PlatformMode(
            base_url="http://plane.test",
            gateway_token=GATEWAY_TOKEN,
            client=plane_http,
            outbox=SQLiteOutbox(str(tmp_path / "outbox.db")),
            retry=RetryPolicy(initial_delay=0.02, max_delay=0.05),
            report_timeout=0.3,
        )
        app = GatewayMiddleware(Starlette(routes=gateway_routes(client=client)), mode=mode)
        async with mode:
            yield app, mode


def body(path: str, **extra: Any) -> dict[str, Any]:
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if path == MESSAGES:
        data["max_tokens"] = 50
    return {**data, **extra}


BEARER = {"authorization": "Bearer tok-alice"}


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
async def test_control_plane_down_at_resolve_is_503_in_the_envelope(
    gateway: tuple[Any, PlatformMode], plane: FakeControlPlane, path: str
) -> None:
    app, mode = gateway
    plane.down = True
    ex = await call(app, path, json_body=body(path), headers=BEARER)
    assert ex.status == 503
    data = ex.json()
    if path == MESSAGES:
        assert data["type"] == "error"
        assert data["error"]["type"] == "api_error"
    else:
        assert data["error"]["type"] == "api_error"
    assert GATEWAY_TOKEN not in ex.body.decode()
    # A 5xx leaves the gateway unsure whether it was admitted: it is released, once.
    plane.down = False
    mode.sender.notify()
    await until(lambda: len(plane.reports) == 1)
    [report] = plane.reports.values()
    assert report["status"] == "released"
    assert plane.report_problems() == []


async def test_reports_made_during_an_outage_arrive_later_exactly_once(
    gateway: tuple[Any, PlatformMode], plane: FakeControlPlane, provider: tuple[FakeProvider, str]
) -> None:
    app, mode = gateway
    fake, _ = provider
    fake.behavior = FakeBehavior(events=3, input_tokens=9, delay=0.01)
    plane.fail_usage_posts = 10**6  # every report fails while "down"
    plane.stall_usage_posts = 0
    exchanges = [Exchange() for _ in range(6)]

    async def one(index: int, ex: Exchange) -> None:
        path = CHAT if index % 2 else MESSAGES
        disconnect = None
        if index == 5:  # this client leaves mid-stream: an incomplete report

            def disconnect(sent: list[Any]) -> bool:
                return any(b"tok0" in m.get("body", b"") for m in sent)

        await call(
            app, path, json_body=body(path), headers=BEARER, exchange=ex, disconnect=disconnect
        )

    async with anyio.create_task_group() as group:
        for index, ex in enumerate(exchanges):
            group.start_soon(one, index, ex)
    assert [ex.status for ex in exchanges] == [200] * 6
    # Every report was tried (and refused) at least once: only then is "none arrived" news.
    await until(lambda: len({p.idempotency_key for p in plane.usage_posts}) == 6)
    assert {p.answered for p in plane.usage_posts} == {503}
    assert plane.reports == {}  # nothing acknowledged during the outage
    # Recovery: one report is accepted but its answer stalls past the timeout (retried).
    plane.fail_usage_posts = 0
    plane.stall_usage_posts = 1
    plane.stall_seconds = 1.0
    mode.sender.notify()
    await until(lambda: len(plane.reports) == 6, within=10)
    statuses = sorted(report["status"] for report in plane.reports.values())
    assert statuses == ["incomplete"] + ["success"] * 5
    request_ids = {report["request_id"] for report in plane.reports.values()}
    assert len(request_ids) == 6  # one report per request, never two
    assert not [p for p in plane.usage_posts if p.answered == 422]  # never a changed report
    for report in plane.reports.values():
        if report["status"] == "success":
            assert report["usage"]["input_tokens"] == 9
            assert report["usage"]["output_tokens"] == 3

    async def drained() -> bool:
        return await mode.outbox.size() == 0 and await mode.outbox.dead_count() == 0

    await until(drained, within=5)


async def test_secrets_never_reach_the_client(
    gateway: tuple[Any, PlatformMode], plane: FakeControlPlane
) -> None:
    app, mode = gateway
    plane.resolve_status = 500
    ex = await call(app, CHAT, json_body=body(CHAT), headers=BEARER)
    assert ex.status == 503
    text = ex.body.decode() + json.dumps(ex.headers)
    assert GATEWAY_TOKEN not in text
    assert GATEWAY_TOKEN not in repr(mode)


async def test_no_platform_secret_in_debug_logs(
    gateway: tuple[Any, PlatformMode],
    plane: FakeControlPlane,
    provider: tuple[FakeProvider, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The gateway token, the user's token and the upstream key the control plane hands
    out never reach a log line, through success, upstream failure, report retries and a
    control plane outage."""
    caplog.set_level(logging.DEBUG)
    app, mode = gateway
    fake, _ = provider
    token = "tok-SECRET-bob-31337"
    plane.add_user(token, user_id="bob")
    headers = {"authorization": f"Bearer {token}"}
    plane.fail_usage_posts = 2
    for behavior in (FakeBehavior(), FakeBehavior(fail_status=401), FakeBehavior(fail_after=1)):
        fake.behavior = behavior
        await call(app, CHAT, json_body=body(CHAT), headers=headers)
        await call(app, MESSAGES, json_body=body(MESSAGES), headers={"x-api-key": token})
    plane.down = True
    ex = await call(app, CHAT, json_body=body(CHAT), headers=headers)
    assert ex.status == 503
    plane.down = False
    mode.sender.notify()
    await until(lambda: len(plane.reports) == 7)  # six requests and the 503's release
    assert plane.report_problems() == []
    assert caplog.records
    for secret in (GATEWAY_TOKEN, token, UPSTREAM_KEY):
        assert secret not in caplog.text


async def test_client_leaving_during_a_slow_resolve_is_reported_once(
    gateway: tuple[Any, PlatformMode], plane: FakeControlPlane
) -> None:
    app, mode = gateway
    plane.resolve_delay = 0.3
    ex = Exchange()
    ex.disconnect()  # gone as soon as the body was read
    await call(app, CHAT, json_body=body(CHAT), headers=BEARER, exchange=ex)
    assert ex.sent == []
    assert len(plane.resolve_calls) == 1  # the control plane admitted it...
    mode.sender.notify()
    await until(lambda: len(plane.reports) == 1)  # ...so it hears how it ended
    [report] = plane.reports.values()
    assert report["status"] == "incomplete"
