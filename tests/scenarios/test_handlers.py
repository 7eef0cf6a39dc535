"""Buggy custom handlers (get_settlement + settle_stream) behind the real middleware and
StandaloneMode: whatever the handler does wrong, the hold is closed exactly once."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gatewaykit import GatewayMiddleware, get_settlement, settle_stream
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.upstream import Upstream
from gatewaykit.usage import Usage
from tests.asgi import call
from tests.scenarios.conftest import PRICE, new_key, spent

pytestmark = pytest.mark.anyio

PATH = "/v1/chat/completions"
BODY = {
    "model": "test-model",
    "messages": [{"role": "user", "content": "hello there"}],  # 3 tokens estimated
    "max_tokens": 100,
    "stream": True,
}
PROMPT = Usage(input_tokens=3)


class Extractor:
    """Reads ``{"text": ..., "usage": [in, out]}`` lines."""

    def __init__(self) -> None:
        self.partial: Usage | None = None
        self.output_chars = 0
        self._final: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        data = json.loads(chunk)
        self.output_chars += len(data.get("text", ""))
        if "usage" in data:
            self._final = Usage(input_tokens=data["usage"][0], output_tokens=data["usage"][1])

    def result(self) -> Usage | None:
        return self._final


async def upstream(
    texts: list[str], usage: tuple[int, int] | None, *, fail: bool = False, gap: float = 0
) -> AsyncIterator[bytes]:
    for text in texts:
        if gap:
            await anyio.sleep(gap)
        yield json.dumps({"text": text}).encode() + b"\n"
    if fail:
        raise RuntimeError("upstream dropped")
    if usage is not None:
        yield json.dumps({"usage": usage}).encode() + b"\n"


Handler = Callable[[Request], Awaitable[Response]]


async def run(ledger: SQLiteLedger, handler: Handler, **call_options: Any) -> Any:
    await ledger.set_budget("user:alice", limit=Decimal(1))
    key, _ = await new_key(ledger)
    mode = StandaloneMode(
        ledger,
        prices={"test-model": PRICE},
        upstreams=[Upstream("http://upstream.invalid/v1", api_key="sk-x")],
    )
    app = Starlette(
        routes=[Route(PATH, handler, methods=["POST"])],
        middleware=[Middleware(GatewayMiddleware, mode=mode)],
    )
    return await call(
        app,
        PATH,
        json_body=BODY,
        headers={"authorization": f"Bearer {key}"},
        raise_app_exceptions=False,
        **call_options,
    )


async def test_well_behaved_handler_charges_the_reported_usage(ledger: SQLiteLedger) -> None:
    async def handler(request: Request) -> Response:
        settlement = get_settlement(request)
        chunks = settle_stream(upstream(["ab", "cd"], (40, 2)), settlement, Extractor())
        return StreamingResponse(chunks)

    ex = await run(ledger, handler)
    assert ex.status == 200
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=40, output_tokens=2))


async def test_handler_raising_before_the_response_refunds(ledger: SQLiteLedger) -> None:
    async def handler(request: Request) -> Response:
        get_settlement(request).note_upstream_contacted()
        raise RuntimeError("bug in the handler")

    ex = await run(ledger, handler)
    assert isinstance(ex.error, RuntimeError)
    assert await spent(ledger) == 0
    [record] = await ledger.usage()
    assert record.status == "error"
    assert "bug in the handler" in (record.error or "")


async def test_handler_raising_mid_stream_charges_what_was_delivered(
    ledger: SQLiteLedger,
) -> None:
    async def handler(request: Request) -> Response:
        settlement = get_settlement(request)
        chunks = settle_stream(upstream(["abcdefgh"], None, fail=True), settlement, Extractor())
        return StreamingResponse(chunks)

    ex = await run(ledger, handler)
    assert isinstance(ex.error, RuntimeError)
    [record] = await ledger.usage()
    assert record.status == "error"
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=3, output_tokens=2))


async def test_handler_raising_after_settling_keeps_the_first_outcome(
    ledger: SQLiteLedger,
) -> None:
    async def handler(request: Request) -> Response:
        await get_settlement(request).on_success(Usage(input_tokens=10, output_tokens=10))
        raise RuntimeError("late bug")

    await run(ledger, handler)
    [record] = await ledger.usage()
    assert record.status == "success"
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=10, output_tokens=10))


async def test_handler_that_forgets_to_settle_a_200(ledger: SQLiteLedger) -> None:
    async def handler(request: Request) -> Response:
        get_settlement(request).note_upstream_contacted()
        return JSONResponse({"choices": []})

    ex = await run(ledger, handler)
    assert ex.status == 200
    [record] = await ledger.usage()
    assert (record.status, record.usage_source) == ("no_usage", "estimated")
    assert await spent(ledger) == PRICE.cost(PROMPT)


async def test_handler_that_forgets_to_settle_an_error_response_refunds(
    ledger: SQLiteLedger,
) -> None:
    async def handler(request: Request) -> Response:
        return JSONResponse({"error": {"message": "nope"}}, status_code=500)

    ex = await run(ledger, handler)
    assert ex.status == 500
    assert await spent(ledger) == 0


async def test_handler_that_settles_twice_is_charged_once(ledger: SQLiteLedger) -> None:
    async def handler(request: Request) -> Response:
        settlement = get_settlement(request)
        first = await settlement.on_success(Usage(input_tokens=10, output_tokens=1))
        again = await settlement.on_success(Usage(input_tokens=10, output_tokens=1))
        other = await settlement.on_error("boom")
        assert first is again is other
        return JSONResponse({})

    ex = await run(ledger, handler)
    assert ex.status == 200
    assert len(await ledger.usage()) == 1
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=10, output_tokens=1))


async def test_handler_that_abandons_its_iterator(ledger: SQLiteLedger) -> None:
    """The handler reads one chunk of the settled stream and throws the rest away."""

    async def handler(request: Request) -> Response:
        settlement = get_settlement(request)
        chunks = settle_stream(upstream(["abcd", "efgh"], (50, 5)), settlement, Extractor())
        first = await anext(chunks)
        return Response(first)

    ex = await run(ledger, handler)
    assert ex.status == 200
    [record] = await ledger.usage()
    assert record.status == "no_usage"
    # The prompt estimate plus the output that went through the settled stream.
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=3, output_tokens=1))


async def test_client_leaving_a_settle_stream_handler(ledger: SQLiteLedger) -> None:
    async def handler(request: Request) -> Response:
        settlement = get_settlement(request)
        chunks = settle_stream(upstream(["abcd"] * 50, (50, 5), gap=0.05), settlement, Extractor())
        return StreamingResponse(chunks)

    def after_two(sent: list[Any]) -> bool:
        return sum(1 for m in sent if m.get("body")) >= 2

    ex = await run(ledger, handler, disconnect=after_two)
    assert not ex.complete
    [record] = await ledger.usage()
    assert record.status == "incomplete"
    assert record.output_tokens in (2, 3)  # 8 or 12 characters seen when it noticed
    assert await spent(ledger) == record.cost > 0


async def test_usage_reported_then_the_handler_stream_fails_is_charged_as_reported(
    ledger: SQLiteLedger,
) -> None:
    async def failing_after_usage() -> AsyncIterator[bytes]:
        yield json.dumps({"text": "abcdefghijklmnopqrstuvwx"}).encode()  # 24 chars: 6 tokens
        yield json.dumps({"usage": [40, 2]}).encode()
        raise RuntimeError("dropped after the usage")

    async def handler(request: Request) -> Response:
        settlement = get_settlement(request)
        return StreamingResponse(settle_stream(failing_after_usage(), settlement, Extractor()))

    ex = await run(ledger, handler)
    assert isinstance(ex.error, RuntimeError)
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=40, output_tokens=2))


class PartialExtractor(Extractor):
    """Reports the prompt up front, as a user would write it (default source)."""

    def feed(self, chunk: bytes) -> None:
        super().feed(chunk)
        self.partial = Usage(input_tokens=40)


async def test_a_user_extractors_partial_usage_is_topped_up_with_observed_output(
    ledger: SQLiteLedger,
) -> None:
    async def handler(request: Request) -> Response:
        settlement = get_settlement(request)
        chunks = upstream(["abcdefgh"], None, fail=True)
        return StreamingResponse(settle_stream(chunks, settlement, PartialExtractor()))

    await run(ledger, handler)
    assert await spent(ledger) == PRICE.cost(Usage(input_tokens=40, output_tokens=2))
