"""Every way a gated request can end settles its hold exactly once (docs/settlement.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any, cast

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gatewaykit import GatewayMiddleware, get_settlement
from gatewaykit.context import SCOPE_KEY, GatewayContext
from gatewaykit.ledger.base import Hold, HoldState, Ledger
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.ratelimit import InProcessRateLimiter, RateLimit, RateLimiter
from gatewaykit.usage import Usage, UsageSource
from tests.asgi import Exchange, call
from tests.middleware.conftest import (
    MASTER_KEY,
    PRICES,
    UPSTREAMS,
    MakeKey,
    bearer,
    chat,
    open_backend,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["fake", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[Ledger]:
    """Every settlement path against every ledger backend."""
    async with open_backend(request.param) as opened:
        yield opened


Endpoint = Callable[[Request], Any]
MICRO = Decimal("0.000001")


def gated(mode: StandaloneMode, endpoint: Endpoint, **options: Any) -> ASGIApp:
    return Starlette(
        routes=[
            Route("/v1/chat/completions", endpoint, methods=["POST"]),
            Route("/v1/messages", endpoint, methods=["POST"]),
        ],
        middleware=[Middleware(GatewayMiddleware, mode=mode, **options)],
    )


async def spent(ledger: Ledger, scope: str = "user:alice") -> Decimal:
    status = await ledger.status(scope)
    return Decimal(0) if status is None else status.spent


async def only_hold(ledger: Ledger) -> HoldState:
    holds = await ledger.holds(live_only=False)
    assert len(holds) == 1
    return holds[0].state


async def no_live_holds(ledger: Ledger) -> None:
    assert await ledger.holds() == []
    assert await ledger.check() == []


@pytest.fixture
async def key(make_key: MakeKey) -> str:
    return (await make_key("alice"))[0]


BODY = chat("hi", max_tokens=10)  # estimate: 1 prompt token + 10 output = 21 µUSD


async def test_success_charges_the_reported_usage(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def endpoint(request: Request) -> Response:
        settlement = get_settlement(request)
        assert settlement.estimate.amount == 21 * MICRO
        settlement.note_upstream_contacted()
        outcome = await settlement.on_success(Usage(input_tokens=10, output_tokens=5))
        assert outcome.charged == 20 * MICRO
        return JSONResponse({"ok": True})

    ex = await call(gated(make_mode(), endpoint), json_body=BODY, headers=bearer(key))
    assert ex.status == 200
    assert ex.headers["x-request-id"].startswith("req_")
    assert await spent(ledger) == 20 * MICRO
    assert await only_hold(ledger) is HoldState.SETTLED
    (record,) = await ledger.usage()
    assert (record.status, record.usage_source, record.cost) == ("success", "provider", 20 * MICRO)
    assert record.request_id == ex.headers["x-request-id"]
    assert (record.user, record.model, record.endpoint) == ("alice", "gpt-test", "chat.completions")
    await no_live_holds(ledger)


async def test_handler_that_never_settles_gets_the_missing_usage_policy(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def endpoint(request: Request) -> Response:
        get_settlement(request).note_output(8)
        return JSONResponse({"ok": True})

    ex = await call(gated(make_mode(), endpoint), json_body=BODY, headers=bearer(key))
    assert ex.status == 200
    # estimate policy: 1 prompt token + ceil(8/4) output tokens = 1 + 4 µUSD
    assert await spent(ledger) == 5 * MICRO
    (record,) = await ledger.usage()
    assert (record.status, record.usage_source) == ("no_usage", "estimated")
    await no_live_holds(ledger)


@pytest.mark.parametrize(
    ("policy", "expected", "status"),
    [("allow_free", 0, "no_usage"), ("hold", 21, "no_usage"), ("fail", 1, "no_usage")],
)
async def test_missing_usage_policies(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    key: str,
    policy: str,
    expected: int,
    status: str,
) -> None:
    async def endpoint(request: Request) -> Response:
        return JSONResponse({"ok": True})

    mode = make_mode(missing_usage=policy)
    await call(gated(mode, endpoint), json_body=BODY, headers=bearer(key))
    assert await spent(ledger) == expected * MICRO
    (record,) = await ledger.usage()
    assert record.status == status
    assert (record.error is not None) == (policy == "fail")
    await no_live_holds(ledger)


async def test_error_response_without_settling_is_refunded(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def endpoint(request: Request) -> Response:
        return JSONResponse({"error": "nope"}, status_code=502)

    ex = await call(gated(make_mode(), endpoint), json_body=BODY, headers=bearer(key))
    assert ex.status == 502
    assert await spent(ledger) == 0
    assert await only_hold(ledger) is HoldState.RELEASED
    (record,) = await ledger.usage()
    assert record.status == "error"
    await no_live_holds(ledger)


async def test_exception_before_the_response_refunds_and_propagates(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def endpoint(request: Request) -> Response:
        get_settlement(request).note_upstream_contacted()
        raise RuntimeError("boom")

    app = gated(make_mode(), endpoint)
    with pytest.raises(RuntimeError, match="boom"):
        await call(app, json_body=BODY, headers=bearer(key))
    assert await spent(ledger) == 0
    assert await only_hold(ledger) is HoldState.RELEASED
    (record,) = await ledger.usage()
    assert record.status == "error"
    assert record.error == "RuntimeError: boom"
    await no_live_holds(ledger)


async def test_exception_mid_stream_charges_what_was_delivered(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def endpoint(request: Request) -> Response:
        settlement = get_settlement(request)

        async def body() -> AsyncIterator[bytes]:
            settlement.note_output(12)
            yield b"data: hello world!\n\n"
            raise RuntimeError("upstream died")

        return StreamingResponse(body(), media_type="text/event-stream")

    with pytest.raises(RuntimeError, match="upstream died"):
        await call(gated(make_mode(), endpoint), json_body=BODY, headers=bearer(key))
    # committed at the first chunk by the middleware: 1 prompt token + 3 output tokens
    assert await spent(ledger) == 7 * MICRO
    (record,) = await ledger.usage()
    assert (record.status, record.usage_source) == ("error", "estimated")
    await no_live_holds(ledger)


async def test_exception_mid_stream_with_release_policy(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def endpoint(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: x\n\n"
            raise RuntimeError("upstream died")

        return StreamingResponse(body())

    with pytest.raises(RuntimeError):
        await call(
            gated(make_mode(disconnect="release"), endpoint), json_body=BODY, headers=bearer(key)
        )
    assert await spent(ledger) == 0
    await no_live_holds(ledger)


async def _disconnect_once(app: ASGIApp, entered: anyio.Event, key: str) -> Exchange:
    ex = Exchange()
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await call(app, json_body=BODY, headers=bearer(key), exchange=ex)

        tg.start_soon(run)
        await entered.wait()
        ex.disconnect()
    return ex


@pytest.mark.parametrize(("policy", "expected"), [("charge_observed", 1), ("release", 0)])
async def test_disconnect_while_upstream_is_silent_cancels_the_handler(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    key: str,
    policy: str,
    expected: int,
) -> None:
    entered, cancelled = anyio.Event(), anyio.Event()

    async def endpoint(request: Request) -> Response:
        get_settlement(request).note_upstream_contacted()
        entered.set()
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")  # pragma: no cover

    ex = await _disconnect_once(gated(make_mode(disconnect=policy), endpoint), entered, key)
    assert cancelled.is_set()
    assert ex.sent == []
    assert await spent(ledger) == expected * MICRO
    (record,) = await ledger.usage()
    assert record.status == "incomplete"
    await no_live_holds(ledger)


async def test_disconnect_before_the_upstream_was_contacted_refunds(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    entered = anyio.Event()

    async def endpoint(request: Request) -> Response:
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    await _disconnect_once(gated(make_mode(), endpoint), entered, key)
    assert await spent(ledger) == 0
    assert await only_hold(ledger) is HoldState.RELEASED
    await no_live_holds(ledger)


async def test_disconnect_mid_stream_charges_partial_usage_and_output(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    closed = anyio.Event()

    async def endpoint(request: Request) -> Response:
        settlement = get_settlement(request)

        async def body() -> AsyncIterator[bytes]:
            try:
                settlement.note_usage(Usage(input_tokens=50, source=UsageSource.PARTIAL))
                settlement.note_output(40)
                yield b"data: first\n\n"
                await anyio.sleep_forever()
            finally:
                closed.set()

        return StreamingResponse(body(), media_type="text/event-stream")

    def after_first_chunk(sent: list[Any]) -> bool:
        return any(m.get("body") for m in sent)

    ex = await call(
        gated(make_mode(), endpoint),
        json_body=BODY,
        headers=bearer(key),
        disconnect=after_first_chunk,
    )
    assert ex.status == 200
    assert not ex.complete
    # provider-reported 50 input tokens + ceil(40/4) observed output tokens
    assert await spent(ledger) == (50 + 2 * 10) * MICRO
    (record,) = await ledger.usage()
    assert (record.status, record.usage_source) == ("incomplete", "partial")
    await no_live_holds(ledger)


async def test_disconnect_after_the_response_cancels_nothing(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    finished = anyio.Event()

    async def later() -> None:
        await anyio.sleep(0.01)
        finished.set()

    async def endpoint(request: Request) -> Response:
        await get_settlement(request).on_success(Usage(1, 1))
        return JSONResponse({"ok": True}, background=BackgroundTask(later))

    ex = await call(gated(make_mode(), endpoint), json_body=BODY, headers=bearer(key))
    assert ex.complete
    assert finished.is_set()
    assert await spent(ledger) == 3 * MICRO
    await no_live_holds(ledger)


async def test_outer_cancellation_settles_as_incomplete(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    entered = anyio.Event()

    async def endpoint(request: Request) -> Response:
        get_settlement(request).note_upstream_contacted()
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover

    app = gated(make_mode(), endpoint)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call(app, json_body=BODY, headers=bearer(key)))
        await entered.wait()
        tg.cancel_scope.cancel()
    assert await spent(ledger) == MICRO
    (record,) = await ledger.usage()
    assert record.status == "incomplete"
    await no_live_holds(ledger)


async def test_the_app_learns_of_the_disconnect_through_receive(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    seen: list[str] = []
    contacted = anyio.Event()

    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        assert first["type"] == "http.request"
        assert first["more_body"] is False
        context = scope[SCOPE_KEY]
        assert isinstance(context, GatewayContext)
        context.settlement.note_upstream_contacted()
        contacted.set()
        with anyio.CancelScope(shield=True):
            seen.append((await receive())["type"])
            seen.append((await receive())["type"])

    app = GatewayMiddleware(raw_app, mode=make_mode())
    ex = Exchange()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call(app, json_body=BODY, headers=bearer(key), exchange=ex))
        await contacted.wait()
        ex.disconnect()
    assert seen == ["http.disconnect", "http.disconnect"]
    assert await spent(ledger) == MICRO
    await no_live_holds(ledger)


async def test_client_leaving_during_the_body_admits_nothing(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def endpoint(request: Request) -> Response:  # pragma: no cover - never reached
        raise AssertionError

    ex = await call(
        gated(make_mode(), endpoint),
        json_body=BODY,
        headers=bearer(key),
        disconnect_during_body=True,
    )
    assert ex.sent == []
    assert await ledger.holds(live_only=False) == []


async def test_first_terminal_hook_wins(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def endpoint(request: Request) -> Response:
        settlement = get_settlement(request)
        first = await settlement.on_success(Usage(2, 0))
        assert await settlement.on_error("late") is first
        assert await settlement.on_incomplete() is first
        assert await settlement.on_no_usage() is first
        raise RuntimeError("after settling")

    with pytest.raises(RuntimeError):
        await call(gated(make_mode(), endpoint), json_body=BODY, headers=bearer(key))
    assert await spent(ledger) == 2 * MICRO
    assert len(await ledger.usage()) == 1
    await no_live_holds(ledger)


async def test_heartbeats_extend_the_hold_while_the_response_lives(
    ledger: Ledger,
    make_mode: Callable[..., StandaloneMode],
    key: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expiries = []
    extended = [anyio.Event()]  # set (and replaced) each time a heartbeat extended the hold
    extend = ledger.extend

    async def counted_extend(hold_id: str, *, ttl: float) -> Hold:
        hold = await extend(hold_id, ttl=ttl)
        done, extended[0] = extended[0], anyio.Event()
        done.set()
        return hold

    monkeypatch.setattr(ledger, "extend", counted_extend)

    async def next_heartbeats(count: int) -> None:
        for _ in range(count):
            await extended[0].wait()

    async def endpoint(request: Request) -> Response:
        settlement = get_settlement(request)

        async def body() -> AsyncIterator[bytes]:
            for _ in range(3):
                hold = await ledger.get_hold(settlement.request_id)
                assert hold is not None
                expiries.append(hold.expires_at)
                yield b"data: x\n\n"
                # Two: the first may have begun before the read above.
                await next_heartbeats(2)
            await settlement.on_success(Usage(1, 1))

        return StreamingResponse(body())

    app = gated(make_mode(hold_ttl=30), endpoint, heartbeat_interval=0.01)
    ex = await call(app, json_body=BODY, headers=bearer(key))
    assert ex.status == 200
    assert expiries[0] < expiries[1] < expiries[2]
    await no_live_holds(ledger)


async def test_cancellation_while_admitting_does_not_leak_the_hold(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    inner = make_mode()
    admitted = anyio.Event()

    class SlowToReturn:
        async def resolve(self, request: GatewayRequest) -> GatewayContext:
            context = await inner.resolve(request)  # the hold exists from here
            admitted.set()
            await anyio.sleep(0.05)
            return context

    async def endpoint(request: Request) -> Response:  # pragma: no cover - never reached
        raise AssertionError

    app = Starlette(
        routes=[Route("/v1/chat/completions", endpoint, methods=["POST"])],
        middleware=[Middleware(GatewayMiddleware, mode=SlowToReturn())],
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call(app, json_body=BODY, headers=bearer(key)))
        await admitted.wait()
        tg.cancel_scope.cancel()
    # The cancelled request returns at once; its admission finishes on its own and is
    # then closed (released: nothing was sent upstream).
    for _ in range(500):
        if await only_hold(ledger) is not HoldState.HELD:
            break
        await anyio.sleep(0.01)
    assert await only_hold(ledger) is HoldState.RELEASED
    await no_live_holds(ledger)


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    raise AssertionError


async def test_only_a_modes_own_class_vouches_for_a_direct_resolve(ledger: Ledger) -> None:
    """A subclass may await after the hold: it gets the shielded admission task, as does
    StandaloneMode over a ledger whose operations a plain cancel may cut (PostgreSQL's
    batches, the fake)."""
    mode = StandaloneMode(ledger, prices=PRICES, upstreams=UPSTREAMS, master_key=MASTER_KEY)
    expected = getattr(ledger, "cancel_safe", False) is True
    assert mode.cancel_safe is expected
    assert GatewayMiddleware(_no_app, mode=mode).resolve_directly is expected

    class Wrapped(StandaloneMode):
        async def resolve(self, request: GatewayRequest) -> GatewayContext:
            context = await super().resolve(request)
            await anyio.lowlevel.checkpoint()  # a cancellation here would leak the hold
            return context

    wrapped = Wrapped(ledger, prices=PRICES, upstreams=UPSTREAMS, master_key=MASTER_KEY)
    assert GatewayMiddleware(_no_app, mode=wrapped).resolve_directly is False
    from gatewaykit.ledger.postgres import PostgresLedger

    assert getattr(PostgresLedger, "cancel_safe", False) is False


@pytest.mark.parametrize("committed", [True, False], ids=["reserve-committed", "reserve-pending"])
async def test_standalone_mode_releases_a_hold_whose_request_was_cancelled_mid_reserve(
    ledger: Ledger, key: str, committed: bool
) -> None:
    """StandaloneMode is awaited in the request's own task (``cancel_safe``): cancelled
    while its reserve is in flight — written already, or not yet — it releases the hold
    itself (a tombstone when the release comes first) and records the request incomplete."""
    reserving = anyio.Event()

    class SlowReserve:
        def __getattr__(self, name: str) -> Any:
            return getattr(ledger, name)

        async def reserve(self, hold_id: str, *args: Any, **options: Any) -> Any:
            if committed:
                hold = await ledger.reserve(hold_id, *args, **options)
            reserving.set()
            await anyio.sleep(1)  # the client leaves here
            return hold if committed else await ledger.reserve(hold_id, *args, **options)

    if not getattr(ledger, "cancel_safe", False):
        pytest.skip("only a ledger whose operations survive cancellation is awaited directly")
    mode = StandaloneMode(
        cast(Ledger, SlowReserve()), prices=PRICES, upstreams=UPSTREAMS, master_key=MASTER_KEY
    )
    assert mode.cancel_safe is True
    assert GatewayMiddleware(_no_app, mode=mode).resolve_directly

    async def endpoint(request: Request) -> Response:  # pragma: no cover - never reached
        raise AssertionError

    app = gated(mode, endpoint)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call(app, json_body=BODY, headers=bearer(key)))
        await reserving.wait()
        tg.cancel_scope.cancel()
    for _ in range(500):
        holds = await ledger.holds(live_only=False)
        if holds and holds[0].state is not HoldState.HELD:
            break
        await anyio.sleep(0.01)
    [hold] = await ledger.holds(live_only=False)
    assert hold.state is HoldState.RELEASED
    assert ("user:alice" in hold.scopes) is committed  # else the release's tombstone
    [record] = await ledger.usage()
    assert (record.request_id, record.status, record.usage_source) == (
        hold.hold_id,
        "incomplete",
        "none",
    )
    assert record.cost == 0
    await no_live_holds(ledger)


async def test_a_token_estimate_counted_before_a_cancellation_is_returned(
    ledger: Ledger, make_key: MakeKey
) -> None:
    """Cancelled while the limiter counts its token estimate (a Redis round trip, say),
    the admission gives the estimate back: the key's whole TPM is free again."""
    if not getattr(ledger, "cancel_safe", False):
        pytest.skip("only a ledger whose operations survive cancellation is awaited directly")
    key, record = await make_key("alice")
    inner = InProcessRateLimiter()
    counting = anyio.Event()

    class SlowLimiter:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        async def acquire(self, request_id: str, limits: Any, tokens: int) -> Any:
            decision = await inner.acquire(request_id, limits, tokens)
            counting.set()
            await anyio.sleep(1)  # the answer is on its way back when the client leaves
            return decision

    mode = StandaloneMode(
        ledger,
        prices=PRICES,
        upstreams=UPSTREAMS,
        master_key=MASTER_KEY,
        default_tpm=100_000,
        rate_limiter=cast(RateLimiter, SlowLimiter()),
    )

    async def endpoint(request: Request) -> Response:  # pragma: no cover - never reached
        raise AssertionError

    app = gated(mode, endpoint)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call(app, json_body=BODY, headers=bearer(key)))
        await counting.wait()
        tg.cancel_scope.cancel()
    whole = [RateLimit(f"key:{record.key_id}", tpm=100_000)]
    for _ in range(200):
        if (await inner.acquire("probe", whole, 100_000)).allowed:
            break
        await anyio.sleep(0.01)
    else:
        raise AssertionError("the cancelled request's token estimate stayed counted")
    assert await ledger.holds(live_only=False) == []  # nothing was reserved


class _Lines:
    partial: Usage | None = None
    output_chars = 0

    def __init__(self) -> None:
        self.final: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        self.output_chars += len(chunk)
        if chunk.startswith(b"usage"):
            self.final = Usage(3, 4)

    def result(self) -> Usage | None:
        return self.final


@pytest.mark.parametrize("point", range(6))
async def test_disconnect_at_each_point_of_a_stream_settles_once(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str, point: int
) -> None:
    """Disconnect after the point-th message sent (0: start, 1-4: chunks, 5: never)."""
    from gatewaykit.streams import settle_stream

    settlements = []

    async def endpoint(request: Request) -> Response:
        settlement = get_settlement(request)
        settlements.append(settlement)

        async def upstream() -> AsyncIterator[bytes]:
            for chunk in (b"aaaa", b"bbbb", b"cccc", b"usage"):
                await anyio.sleep(0.001)
                yield chunk

        return StreamingResponse(settle_stream(upstream(), settlement, _Lines()))

    ex = await call(
        gated(make_mode(), endpoint),
        json_body=BODY,
        headers=bearer(key),
        disconnect=lambda sent: len(sent) > point,
    )
    (settlement,) = settlements
    outcome = settlement.outcome
    assert outcome is not None
    (record,) = await ledger.usage()
    if ex.complete:
        assert outcome.status == "success"
    if outcome.status == "success":
        assert outcome.charged == (3 + 2 * 4) * MICRO
    else:
        assert outcome.status == "incomplete"
        assert point < 5
        # prompt estimate + the output observed before the client left
        assert outcome.charged == (1 + 2 * ((settlement.output_chars + 3) // 4)) * MICRO
    assert record.status == outcome.status
    assert await spent(ledger) == outcome.charged
    await no_live_holds(ledger)


async def test_a_pathsend_response_counts_as_complete(
    ledger: Ledger, make_mode: Callable[..., StandaloneMode], key: str
) -> None:
    async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": "/dev/null"})
        await anyio.sleep(0.01)  # the disconnect that follows must not cancel this

    ex = await call(
        GatewayMiddleware(raw_app, mode=make_mode()),
        json_body=BODY,
        headers=bearer(key),
        disconnect=lambda sent: sent[-1]["type"] == "http.response.pathsend",
    )
    assert ex.status == 200
    (record,) = await ledger.usage()
    assert record.status == "no_usage"
    await no_live_holds(ledger)
