"""The responses adapter tells the settlement which response the provider created
(``note_response``), streaming and not; the other formats name none."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from gatewaykit.adapters import default_client, gateway_routes, openai_responses
from gatewaykit.adapters.openai_responses import ResponsesStreamUsage
from gatewaykit.adapters.sse import SSEEvent
from gatewaykit.http import AiohttpClient
from gatewaykit.testing import FakeProvider
from tests.adapters.conftest import RESPONSES, Format, Shim
from tests.asgi import call

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[AiohttpClient]:
    async with default_client() as http:
        yield http


def shim_for(fmt: Format, client: AiohttpClient, url: str) -> Shim:
    routes = {route.path: route.endpoint for route in gateway_routes(client=client)}
    return Shim(routes[fmt.path], fmt, [fmt.upstream(url, api_key="sk-upstream")])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
async def test_the_response_id_reaches_the_settlement(
    fmt: Format, stream: bool, provider: tuple[FakeProvider, str], client: AiohttpClient
) -> None:
    _, url = provider
    shim = shim_for(fmt, client, url)
    ex = await call(shim, fmt.path, json_body=fmt.body(stream=stream))
    assert ex.status == 200
    settlement = shim.settlement
    if fmt is not RESPONSES:
        assert settlement.response_id is None
        return
    assert settlement.response_id is not None
    assert settlement.response_id.startswith("resp_fake_")
    assert settlement.response_id.encode() in ex.body
    # Noted before the settlement finished (it remembers the context with the settle).
    assert settlement.call.status == "success"


def _event(kind: str, **fields: Any) -> SSEEvent:
    return SSEEvent(f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode())


def test_the_stream_extractor_reads_the_id_from_created_or_terminal_events() -> None:
    extractor = ResponsesStreamUsage()
    extractor.observe(_event("response.created", response={"id": "resp_a", "status": "x"}))
    extractor.observe(_event("response.completed", response={"id": "resp_b", "usage": None}))
    assert extractor.response_id == "resp_a"  # the first one named stays
    late = ResponsesStreamUsage()
    late.observe(_event("response.output_text.delta", delta="hi"))
    late.observe(_event("response.incomplete", response={"id": "resp_c"}))
    assert late.response_id == "resp_c"
    odd = ResponsesStreamUsage()
    odd.observe(_event("response.created", response={"id": 5}))
    odd.observe(_event("response.created", response="resp_d"))
    assert odd.response_id is None


async def test_a_json_body_without_an_id_notes_nothing() -> None:
    body = {
        "object": "response",
        "status": "completed",
        "output": [],
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
    with respx.mock(base_url="https://openai.example") as mock:
        mock.post("/v1/responses").respond(200, json=body)
        async with httpx.AsyncClient() as http:
            shim = Shim(
                openai_responses(client=http),
                RESPONSES,
                [RESPONSES.upstream("https://openai.example")],
            )
            ex = await call(shim, RESPONSES.path, json_body=RESPONSES.body(stream=False))
    assert ex.status == 200
    assert shim.settlement.response_id is None
    assert shim.settlement.call.status == "success"


async def test_settle_stream_notes_the_extractors_response_id() -> None:
    from gatewaykit import settle_stream
    from gatewaykit.testing import RecordingSettlement

    events = [
        _event("response.created", response={"id": "resp_custom"}).raw,
        _event(
            "response.completed",
            response={"id": "resp_custom", "usage": {"input_tokens": 3, "output_tokens": 1}},
        ).raw,
    ]

    async def source() -> AsyncIterator[bytes]:
        for chunk in events:
            yield chunk

    settlement = RecordingSettlement()
    assert [c async for c in settle_stream(source(), settlement, ResponsesStreamUsage())] == events
    assert settlement.response_id == "resp_custom"
    assert settlement.calls == ["on_first_chunk", "on_success"]
