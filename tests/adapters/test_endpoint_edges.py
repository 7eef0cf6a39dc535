"""Edges of the adapters that the end-to-end tests do not reach: bad options, a client
that breaks its contract, a client that leaves while the answer is sent, and the chat
reader's count of tool-call, reasoning and escaped text."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import anyio
import httpx
import pytest
import respx

from gatewaykit.adapters import ChatStreamUsage, openai_chat_completions
from gatewaykit.errors import ConfigurationError
from gatewaykit.http import Timeouts, UpstreamResponse
from tests.adapters.conftest import CHAT, Shim
from tests.asgi import call

pytestmark = pytest.mark.anyio

OPENAI = "https://openai.example"


class BrokenClient:
    """An UpstreamClient that raises what it must not (not an UpstreamError)."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes,
        headers: Mapping[str, str],
        timeouts: Timeouts,
    ) -> UpstreamResponse:
        raise RuntimeError("a bug in the client")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"first_chunk_timeout": 0}, "first_chunk_timeout"),
        ({"max_response_bytes": True}, "max_response_bytes"),
        ({"max_response_bytes": 0}, "max_response_bytes"),
    ],
)
def test_bad_endpoint_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        openai_chat_completions(client=BrokenClient(), **options)


async def test_an_endpoint_serves_http_only() -> None:
    endpoint = openai_chat_completions(client=BrokenClient())
    assert repr(endpoint) == "<ProxyEndpoint openai_chat>"

    async def receive() -> dict[str, Any]:
        raise AssertionError  # pragma: no cover

    async def send(message: Any) -> None:
        raise AssertionError  # pragma: no cover

    with pytest.raises(ConfigurationError, match="HTTP requests only"):
        await endpoint({"type": "websocket"}, receive, send)


async def test_a_client_bug_is_a_502_in_the_envelope_and_an_error_settlement() -> None:
    shim = Shim(
        openai_chat_completions(client=BrokenClient()), CHAT, [CHAT.upstream(OPENAI, api_key="k")]
    )
    ex = await call(shim, CHAT.path, json_body=CHAT.body(stream=False))
    assert ex.status == 502
    assert ex.json()["error"]["message"] == "the gateway failed while forwarding the request"
    assert shim.settlement.call.status == "error"
    assert "RuntimeError: a bug in the client" in (shim.settlement.call.error or "")


async def test_a_client_gone_while_a_stream_is_sent_is_incomplete() -> None:
    stream = b"data: " + _chunk({"content": "hi"}) + b"\n\ndata: [DONE]\n\n"
    async with httpx.AsyncClient() as client:
        with respx.mock:
            respx.post(f"{OPENAI}/v1/chat/completions").mock(
                return_value=httpx.Response(
                    200, headers={"content-type": "text/event-stream"}, content=stream
                )
            )
            shim = Shim(
                openai_chat_completions(client=client),
                CHAT,
                [CHAT.upstream(OPENAI, api_key="k")],
            )
            raw = json.dumps(CHAT.body(stream=True)).encode()
            messages = [{"type": "http.request", "body": raw, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if messages:
                    return messages.pop(0)
                await anyio.sleep_forever()
                raise AssertionError  # pragma: no cover

            async def send(message: dict[str, Any]) -> None:
                raise OSError("the client's socket is gone")

            scope = {"type": "http", "headers": [], "path": CHAT.path, "method": "POST"}
            with anyio.fail_after(5):
                await shim(scope, receive, send)
    assert shim.settlement.call.status == "incomplete"


def _chunk(delta: dict[str, Any]) -> bytes:
    return json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode()


def test_the_chat_reader_counts_tool_calls_reasoning_and_escaped_text() -> None:
    reader = ChatStreamUsage()
    first = {
        "role": "assistant",
        "content": "hi",
        "reasoning_content": "abc",
        "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}, "odd", {"x": 1}],
    }
    reader.observe_data(_chunk(first))  # parsed whole: 2 + 3 + 1 + 2
    assert reader.output_chars == 8
    reader.observe_data(_chunk({"content": "a\nb"}))  # byte scan: an escape, decoded
    assert reader.output_chars == 11
    reader.observe_data(b'{"choices":[{"delta":{"content":"\\q"}}]}')  # a bad escape
    assert reader.output_chars == 13
    reader.observe_data(json.dumps({"choices": [{"delta": None}, "odd"]}).encode())
    assert reader.output_chars == 13
