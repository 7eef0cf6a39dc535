"""gatewaykit.testing: testing a handler without a gateway, ledger or provider."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from gatewaykit import get_settlement, settle_stream
from gatewaykit.context import get_context
from gatewaykit.envelopes import WireFormat
from gatewaykit.pricing import ModelPrice
from gatewaykit.testing import RecordingSettlement, gateway_request, gateway_scope
from gatewaykit.usage import Usage
from tests.middleware.test_app import LineExtractor

pytestmark = pytest.mark.anyio


async def handler(request: Request) -> JSONResponse:
    body = await request.json()
    settlement = get_settlement(request)
    settlement.note_upstream_contacted()
    await settlement.on_success(Usage(len(body["messages"]), 2))
    return JSONResponse({"ok": True})


async def test_a_handler_can_be_tested_with_a_recording_settlement() -> None:
    settlement = RecordingSettlement(price=ModelPrice(Decimal(1), Decimal(2)))
    request = gateway_request(settlement, body={"model": "m", "messages": [1, 2, 3]})
    response = await handler(request)
    assert response.status_code == 200
    assert settlement.calls == ["on_success"]
    assert settlement.outcome is not None
    assert settlement.outcome.charged == Decimal("0.000007")
    context = get_context(request)
    assert (context.model, context.format, context.user_id) == (
        "m",
        WireFormat.OPENAI_CHAT,
        "test-user",
    )


async def test_recording_settlement_follows_the_state_machine() -> None:
    settlement = RecordingSettlement()
    chunks = [b'{"text": "ab"}\n', b'{"usage": {"in": 1, "out": 1}}\n']

    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    assert [c async for c in settle_stream(source(), settlement, LineExtractor())] == chunks
    await settlement.on_error("late")
    assert settlement.calls == ["on_first_chunk", "on_success", "on_error"]
    assert settlement.outcome is not None
    assert settlement.outcome.status == "success"

    refunded = RecordingSettlement()
    outcome = await refunded.on_error("boom", Usage(5, 0))
    assert (outcome.status, outcome.refunded, outcome.charged) == ("error", True, Decimal(0))
    await refunded.heartbeat()
    assert refunded.heartbeats == 1


def test_gateway_scope_paths() -> None:
    assert gateway_scope(format=WireFormat.ANTHROPIC_MESSAGES)["path"] == "/v1/messages"
    scope = gateway_scope(format=None, path="/custom")
    assert scope["path"] == "/custom"
    assert get_context(scope).attempts[0].upstream.provider == "openai"
