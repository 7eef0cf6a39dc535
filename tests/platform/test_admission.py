"""Exactly one report per admitted request: the admission is recorded before the request
goes upstream and closed with its report; abandoned resolves are released; admissions a
dead process left open are reported incomplete, once (the real-process kill test is in
test_crash_recovery.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gatewaykit.context import get_context
from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import RequestRejected
from gatewaykit.middleware import GatewayMiddleware
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.platform import PlatformMode
from gatewaykit.outbox import AdmissionStore, RetryPolicy, SQLiteOutbox
from gatewaykit.parsing import ParsedRequest
from gatewaykit.pricing import ModelPrice, PriceTable
from gatewaykit.testing import FakeControlPlane, serve_app
from gatewaykit.usage import Usage

from .conftest import GATEWAY_TOKEN, until

pytestmark = pytest.mark.anyio

UP = {"provider": "openai", "base_url": "https://up.test/v1", "api_key": "sk-up"}
PRICES = PriceTable({"gpt-4o-mini": ModelPrice(Decimal("0.15"), Decimal("0.60"))})
CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 40}]}
BEARER = {"authorization": "Bearer tok-alice"}


@pytest.fixture
def plane() -> FakeControlPlane:
    plane = FakeControlPlane(gateway_token=GATEWAY_TOKEN)
    plane.add_user("tok-alice", user_id="alice", budget_usd=Decimal("1"))
    plane.set_attempts("gpt-4o-mini", UP, {**UP, "base_url": "https://up-2.test/v1"})
    return plane


@pytest.fixture
async def plane_url(plane: FakeControlPlane) -> AsyncIterator[str]:
    # A real socket: the control plane goes on working after the gateway gave up on it.
    async with serve_app(plane.app) as url:
        yield url


@pytest.fixture
def outbox_path(tmp_path: Path) -> str:
    return str(tmp_path / "outbox.db")


def make_mode(client: httpx.AsyncClient, url: str, path: str, **options: Any) -> PlatformMode:
    options.setdefault("resolve_timeout", 0.3)
    return PlatformMode(
        base_url=url,
        gateway_token=GATEWAY_TOKEN,
        client=client,
        outbox=SQLiteOutbox(path),
        prices=PRICES,
        retry=RetryPolicy(initial_delay=0.02, max_delay=0.1),
        **options,
    )


@pytest.fixture
async def mode(
    client: httpx.AsyncClient, plane_url: str, outbox_path: str
) -> AsyncIterator[PlatformMode]:
    async with make_mode(client, plane_url, outbox_path) as mode:
        yield mode


def request(request_id: str = "req_1") -> GatewayRequest:
    return GatewayRequest(
        request_id=request_id,
        path=CHAT,
        format=WireFormat.OPENAI_CHAT,
        headers=BEARER,
        body={},
        raw_body=b"{}",
        parsed=ParsedRequest(
            model="gpt-4o-mini", stream=True, prompt_chars=40, max_output_tokens=100
        ),
    )


def store(mode: PlatformMode) -> AdmissionStore:
    assert isinstance(mode.outbox, AdmissionStore)
    return mode.outbox


async def drained(mode: PlatformMode) -> None:
    mode.sender.notify()

    async def empty() -> bool:
        return await mode.outbox.size() == 0

    await until(empty)


# -- the admission record --------------------------------------------------------------


async def test_the_admission_is_on_disk_before_the_app_runs_and_closed_with_the_report(
    mode: PlatformMode, plane: FakeControlPlane
) -> None:
    seen: list[Any] = []

    async def endpoint(http: Request) -> JSONResponse:
        context = get_context(http)
        seen.extend(await store(mode).admissions())  # what a crash right now would leave
        await context.settlement.on_success(Usage(10, 5))
        return JSONResponse({"ok": True})

    app = GatewayMiddleware(Starlette(routes=[Route(CHAT, endpoint, methods=["POST"])]), mode=mode)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gw"
    ) as gw:
        response = await gw.post(CHAT, json=BODY, headers=BEARER)
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    [admission] = seen
    assert admission.request_id == request_id
    assert mode.admissions is not None
    assert admission.owner == mode.admissions.instance_id
    assert admission.details["attempt_ids"] == list(plane.admitted[request_id].attempt_ids)
    assert admission.details["model"] == "gpt-4o-mini"
    assert admission.details["endpoint"] == "chat.completions"
    assert admission.details["prompt_tokens_estimate"] == 10
    assert await store(mode).admission_count() == 0  # closed by the report
    await drained(mode)
    [report] = plane.reports_for(request_id)
    assert report["status"] == "success"
    assert plane.report_problems() == []


async def test_normal_requests_leave_nothing_to_recover_after_a_restart(
    client: httpx.AsyncClient, plane: FakeControlPlane, plane_url: str, outbox_path: str
) -> None:
    async with make_mode(client, plane_url, outbox_path) as mode:
        for n in range(5):
            context = await mode.resolve(request(f"req_{n}"))
            settlement = context.settlement
            if n % 2:
                await settlement.on_success(Usage(n, n))
            else:
                await settlement.on_incomplete()
        await drained(mode)
    async with make_mode(client, plane_url, outbox_path, admission_lease=0.2) as again:
        await anyio.sleep(0.5)  # past the lease: nothing is left to recover
        assert again.admissions is not None
        assert again.admissions.recovered == 0
    assert sorted(plane.reports) == sorted(
        f"req_{n}:{plane.admitted[f'req_{n}'].attempt_ids[0]}" for n in range(5)
    )
    assert plane.report_problems() == []
    assert plane.unreported() == set()


async def test_a_request_the_admission_cannot_be_recorded_for_is_refused_and_released(
    mode: PlatformMode, plane: FakeControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> bool:
        raise OSError("disk full")

    monkeypatch.setattr(mode.outbox, "admit", broken)
    with pytest.raises(RequestRejected) as caught:
        await mode.resolve(request())
    assert caught.value.status == 503
    assert "cannot record usage" in caught.value.message
    await drained(mode)
    [report] = plane.reports.values()
    assert (report["status"], report["attempt_id"]) == ("released", "-")
    assert report["error"] == "the gateway could not record the admission"
    assert plane.report_problems() == []


async def test_a_duplicate_request_id_is_refused_and_not_released(
    mode: PlatformMode, plane: FakeControlPlane
) -> None:
    first = await mode.resolve(request("req_dup"))
    with pytest.raises(RequestRejected):
        await mode.resolve(request("req_dup"))
    await first.settlement.on_success(Usage(1, 1))
    await drained(mode)
    [report] = plane.reports.values()
    assert report["status"] == "success"  # the first request's admission was left alone


# -- abandoned resolves ----------------------------------------------------------------


async def test_a_resolve_answered_after_the_timeout_is_released_once(
    mode: PlatformMode, plane: FakeControlPlane
) -> None:
    plane.resolve_answer_delay = 1.0  # admits at once, answers after the gateway gave up
    with pytest.raises(RequestRejected) as caught:
        await mode.resolve(request())
    assert caught.value.status == 503
    assert "req_1" in plane.admitted
    assert plane.users["tok-alice"].held_usd > 0
    await drained(mode)
    assert list(plane.reports) == ["req_1:-"]
    report = plane.reports["req_1:-"]
    assert report["status"] == "released"
    assert report["usage"] is None
    assert report["usage_source"] == "none"
    assert report["error"] == "no resolve answer in time"
    assert report["observed"] == {
        "upstream_contacted": False,
        "committed": False,
        "output_chars": 0,
        "prompt_tokens_estimate": 10,
    }
    assert plane.unreported() == set()
    assert plane.report_problems() == []
    assert plane.users["tok-alice"].held_usd == 0  # nothing to charge: the hold came back
    assert await store(mode).admission_count() == 0


async def test_a_release_that_overtakes_the_late_admission_prevents_it(
    mode: PlatformMode, plane: FakeControlPlane
) -> None:
    plane.resolve_delay = 2.0  # the control plane admits only after the gateway gave up
    with pytest.raises(RequestRejected):
        await mode.resolve(request())
    await drained(mode)  # the release arrives first...
    assert plane.released_early == {"req_1"}
    await until(lambda: plane.resolve_calls, within=5)  # the late resolve is looked at
    assert plane.admitted == {}  # ...and admits nothing
    assert list(plane.reports) == ["req_1:-"]
    assert plane.report_problems() == []


async def test_a_caller_giving_up_during_resolve_releases(
    mode: PlatformMode, plane: FakeControlPlane
) -> None:
    """The middleware shields resolve; a mode delegating to PlatformMode might not."""
    plane.resolve_answer_delay = 1.0
    with anyio.move_on_after(0.1):
        await mode.resolve(request())
    await drained(mode)
    [report] = plane.reports.values()
    assert report["status"] == "released"
    assert report["error"] == "the gateway stopped waiting for resolve"
    assert plane.report_problems() == []


async def test_a_connection_lost_after_sending_releases(
    outbox_path: str, plane: FakeControlPlane, plane_url: str, client: httpx.AsyncClient
) -> None:
    def reset(http: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection", request=http)

    async with httpx.AsyncClient(transport=httpx.MockTransport(reset)) as broken:
        mode = make_mode(broken, plane_url, outbox_path, shutdown_timeout=0.1)
        async with mode:
            with pytest.raises(RequestRejected):
                await mode.resolve(request())
            [item] = await mode.outbox.claim(limit=5, lease=60, due_only=False)
    assert item.key == "req_1:-"
    assert item.payload["error"] == "the resolve call failed (RemoteProtocolError)"


# -- recovery --------------------------------------------------------------------------


async def test_a_stable_instance_reports_what_its_killed_run_left_open_at_start(
    client: httpx.AsyncClient, plane: FakeControlPlane, plane_url: str, outbox_path: str
) -> None:
    async with SQLiteOutbox(outbox_path) as box:  # what a kill -9 mid-request leaves behind
        await box.heartbeat("gw-1")
        for n in range(3):
            await box.admit(
                f"req_{n}",
                {"attempt_ids": [f"att_{n}a", f"att_{n}b"], "prompt_tokens_estimate": 7},
                owner="gw-1",
            )
    async with make_mode(client, plane_url, outbox_path, instance_id="gw-1") as mode:
        assert mode.admissions is not None
        assert mode.admissions.recovered == 3  # at once, not after the lease
        await drained(mode)
    assert sorted(plane.reports) == ["req_0:att_0a", "req_1:att_1a", "req_2:att_2a"]
    report = plane.reports["req_1:att_1a"]
    assert report["status"] == "incomplete"
    assert report["usage"] is None
    assert report["usage_source"] == "none"
    assert report["error"].startswith("gateway restarted:")
    assert report["observed"] == {
        "upstream_contacted": None,
        "committed": None,
        "output_chars": None,
        "prompt_tokens_estimate": 7,
    }


async def test_a_request_still_open_at_shutdown_is_reported_once(
    client: httpx.AsyncClient,
    plane: FakeControlPlane,
    plane_url: str,
    outbox_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mode = make_mode(client, plane_url, outbox_path)
    async with mode:
        context = await mode.resolve(request())
    # Left open when the mode stopped: reported (and flushed) as it stopped.
    [report] = plane.reports.values()
    assert report["status"] == "incomplete"
    assert report["error"] == "the gateway shut down before the request ended"
    outcome = await context.settlement.on_success(Usage(3, 3))  # too late to be stored
    assert outcome.status == "success"
    assert len(plane.reports) == 1
    assert plane.report_problems() == []


async def test_requests_arriving_while_the_mode_stops_are_refused(
    client: httpx.AsyncClient,
    plane: FakeControlPlane,
    plane_url: str,
    outbox_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mode = make_mode(client, plane_url, outbox_path)
    async with mode:
        context = await mode.resolve(request("req_open"))
        mode._stopping = True  # what leaving the block sets first
        with pytest.raises(RequestRejected) as caught:
            await mode.resolve(request("req_late"))
        mode._stopping = False
        await context.settlement.on_success(Usage(1, 1))
    assert caught.value.status == 503
    assert "shutting down" in caught.value.message
    assert "async with mode" not in caplog.text  # not a configuration error
    assert [c["request_id"] for c in plane.resolve_calls] == ["req_open"]


async def test_a_stalled_owner_does_not_report_a_request_someone_else_recovered(
    mode: PlatformMode, plane: FakeControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    context = await mode.resolve(request())
    assert mode.admissions is not None
    # Another process decided this one was dead (it missed its heart-beats) and took over.
    from gatewaykit.modes.platform import recovered_report

    keys = await store(mode).recover(
        lambda a: recovered_report(a, "crash"),
        stale_after=3600,
        owner=mode.admissions.instance_id,
    )
    assert len(keys) == 1
    await context.settlement.on_success(Usage(4, 4))
    assert "already reported request req_1 as incomplete" in caplog.text
    await drained(mode)
    [report] = plane.reports.values()
    assert report["status"] == "incomplete"
    assert plane.report_problems() == []
    logged = caplog.text.split("report: ", 1)[1].splitlines()[0]
    assert json.loads(logged)["usage"]["output_tokens"] == 4  # kept in the log


async def test_an_outbox_without_admissions_still_works_and_says_so(
    client: httpx.AsyncClient,
    plane: FakeControlPlane,
    plane_url: str,
    outbox_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    class PlainOutbox:
        """An Outbox that keeps no admissions (a user's own, written before they existed)."""

        def __init__(self, inner: SQLiteOutbox) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            if name in ("admit", "complete", "recover", "heartbeat", "retire", "admissions"):
                raise AttributeError(name)
            return getattr(self._inner, name)

        @property
        def is_open(self) -> bool:
            return self._inner.is_open

    outbox = PlainOutbox(SQLiteOutbox(outbox_path))
    assert not isinstance(outbox, AdmissionStore)
    mode = PlatformMode(
        base_url=plane_url, gateway_token=GATEWAY_TOKEN, client=client, outbox=outbox
    )
    assert mode.admissions is None
    async with mode:
        context = await mode.resolve(request())
        await context.settlement.on_success(Usage(2, 2))
        await drained(mode)
    assert "does not keep open admissions" in caplog.text
    [report] = plane.reports.values()
    assert report["status"] == "success"
