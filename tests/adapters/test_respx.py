"""The adapters against respx-mocked upstreams: exact bytes, headers, odd streams."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import httpx
import pytest
import respx

from gatewaykit.adapters import anthropic_messages, openai_chat_completions, openai_responses
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.upstream import Attempt
from gatewaykit.usage import Usage
from tests.adapters.conftest import CHAT, MESSAGES, PRICE, RESPONSES, Format, Shim
from tests.asgi import call

pytestmark = pytest.mark.anyio

OPENAI = "https://openai.example"
ANTHROPIC = "https://anthropic.example"


class Chunks(httpx.AsyncByteStream):
    """A response body delivered in exactly these reads."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def sse_response(chunks: list[bytes]) -> httpx.Response:
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=Chunks(chunks))


def chat_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def content(text: str) -> bytes:
    return chat_event({"choices": [{"index": 0, "delta": {"content": text}}]})


USAGE = chat_event(
    {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}
)
DONE = b"data: [DONE]\n\n"


def endpoint_for(fmt: Format, client: httpx.AsyncClient, **options: Any) -> Any:
    factory = {
        CHAT.name: openai_chat_completions,
        MESSAGES.name: anthropic_messages,
        RESPONSES.name: openai_responses,
    }[fmt.name]
    return factory(client=client, **options)


def upstream_for(fmt: Format) -> Any:
    base = OPENAI if fmt.provider == "openai" else ANTHROPIC
    return fmt.upstream(base, api_key="sk-upstream-secret")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as http:
        yield http


async def test_bytes_are_forwarded_read_by_read_and_never_rechunked(
    client: httpx.AsyncClient,
) -> None:
    one, two, three, four = content("a"), content("b"), content("c"), content("d")
    reads = [one + two, three[:10], three[10:] + four, USAGE + DONE]
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(return_value=sse_response(reads))
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        ex = await call(shim, CHAT.path, json_body=CHAT.body(stream=True))
    # One send per read that completes events; a read ending mid-event waits for the rest;
    # the hidden usage chunk is cut out and [DONE] waits for the settlement.
    assert ex.chunks == [one + two, three + four, DONE]
    assert shim.settlement.call.usage == Usage(input_tokens=11, output_tokens=3)


async def test_the_clients_own_usage_chunk_is_kept(client: httpx.AsyncClient) -> None:
    reads = [content("a"), USAGE, DONE]
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(return_value=sse_response(reads))
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        body = CHAT.body(stream=True, stream_options={"include_usage": True})
        ex = await call(shim, CHAT.path, json_body=body)
    assert ex.chunks == [content("a"), USAGE, DONE]


async def test_inject_stream_usage_can_be_turned_off(client: httpx.AsyncClient) -> None:
    with respx.mock:
        route = respx.post(f"{OPENAI}/v1/chat/completions").mock(
            return_value=sse_response([content("a"), DONE])
        )
        endpoint = openai_chat_completions(client=client, inject_stream_usage=False)
        shim = Shim(endpoint, CHAT, [upstream_for(CHAT)])
        await call(shim, CHAT.path, json_body=CHAT.body(stream=True))
    assert "stream_options" not in json.loads(route.calls.last.request.content)
    assert shim.settlement.call.status == "no_usage"


@pytest.mark.parametrize("fmt", [CHAT, MESSAGES, RESPONSES], ids=lambda f: f.name)
async def test_upstream_request_carries_the_gateways_credential_only(
    fmt: Format, client: httpx.AsyncClient
) -> None:
    upstream = upstream_for(fmt)
    url = fmt.upstream(OPENAI if fmt.provider == "openai" else ANTHROPIC).base_url
    path = {"chat": "/chat/completions", "messages": "/v1/messages", "responses": "/responses"}
    with respx.mock:
        route = respx.post(url + path[fmt.name]).mock(
            return_value=httpx.Response(400, json={"error": {"message": "no"}})
        )
        shim = Shim(
            endpoint_for(fmt, client), fmt, [Attempt("a1", upstream, "upstream-model-name")]
        )
        client_headers = {
            "authorization": "Bearer gk-client-key",
            "x-api-key": "gk-client-key",
            "anthropic-version": "2023-01-01",
            "anthropic-beta": "tools-2024",
            "cookie": "session=1",
        }
        ex = await call(shim, fmt.path, json_body=fmt.body(stream=False), headers=client_headers)
    assert ex.status == 400
    sent = route.calls.last.request
    assert json.loads(sent.content)["model"] == "upstream-model-name"
    assert sent.headers["accept-encoding"] == "identity"
    assert "gk-client-key" not in str(sent.headers.raw)
    assert "cookie" not in sent.headers
    if fmt.provider == "openai":
        assert sent.headers["authorization"] == "Bearer sk-upstream-secret"
        assert "x-api-key" not in sent.headers
    else:
        assert sent.headers["x-api-key"] == "sk-upstream-secret"
        assert "authorization" not in sent.headers
        assert sent.headers["anthropic-version"] == "2023-01-01"
        assert sent.headers["anthropic-beta"] == "tools-2024"
    assert "sk-upstream-secret" not in ex.body.decode()


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (httpx.ConnectError("refused"), 502),
        (httpx.ConnectTimeout("slow"), 502),
        (httpx.ReadTimeout("slow"), 504),
        (httpx.RemoteProtocolError("bad"), 502),
    ],
)
async def test_transport_errors_before_the_first_chunk(
    error: Exception, status: int, client: httpx.AsyncClient
) -> None:
    with respx.mock:
        respx.post(f"{ANTHROPIC}/v1/messages").mock(side_effect=error)
        shim = Shim(anthropic_messages(client=client), MESSAGES, [upstream_for(MESSAGES)])
        ex = await call(shim, MESSAGES.path, json_body=MESSAGES.body(stream=True))
    assert ex.status == status
    assert ex.json()["type"] == "error"
    assert ex.json()["error"]["type"] == "api_error"
    assert shim.settlement.outcome is not None
    assert shim.settlement.outcome.refunded


@pytest.mark.parametrize(
    "reads",
    [[], [b"<html>gateway timeout</html>"], [b'data: {"choices": [\n\n']],
    ids=["empty", "not-sse", "bad-json"],
)
async def test_unusable_stream_before_any_event_is_502(
    reads: list[bytes], client: httpx.AsyncClient
) -> None:
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(return_value=sse_response(reads))
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        ex = await call(shim, CHAT.path, json_body=CHAT.body(stream=True))
    assert ex.status == 502
    assert ex.json()["error"]["code"] == "upstream_bad_response"
    assert shim.settlement.outcome is not None
    assert shim.settlement.outcome.refunded


async def test_a_stream_ending_without_done_but_with_usage_succeeds(
    client: httpx.AsyncClient,
) -> None:
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(
            return_value=sse_response([content("a"), USAGE])
        )
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        ex = await call(shim, CHAT.path, json_body=CHAT.body(stream=True))
    assert ex.complete
    assert shim.settlement.call.status == "success"


async def test_a_truncated_stream_is_an_in_band_error(client: httpx.AsyncClient) -> None:
    with respx.mock:
        respx.post(f"{OPENAI}/v1/responses").mock(
            return_value=sse_response([b'event: response.created\ndata: {"type": "x"}\n\n'])
        )
        shim = Shim(openai_responses(client=client), RESPONSES, [upstream_for(RESPONSES)])
        ex = await call(shim, RESPONSES.path, json_body=RESPONSES.body(stream=True))
    assert ex.status == 200
    assert ex.chunks[-1].startswith(b"event: error\n")
    assert shim.settlement.call.status == "error"
    assert "final event" in (shim.settlement.call.error or "")


async def test_nonstream_usage_with_missing_fields(client: httpx.AsyncClient) -> None:
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(
            return_value=httpx.Response(200, json={"choices": [], "usage": {"prompt_tokens": 3}})
        )
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        ex = await call(shim, CHAT.path, json_body=CHAT.body(stream=False))
    assert ex.status == 200  # partial usage fields are read as given
    assert shim.settlement.call.usage == Usage(input_tokens=3)


def test_timeouts_are_validated() -> None:
    from gatewaykit.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="read_timeout"):
        openai_chat_completions(client=cast(Any, None), read_timeout=0)


async def test_an_in_band_error_before_any_output_falls_back_and_refunds(
    client: httpx.AsyncClient,
) -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    overloaded = b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
    with respx.mock:
        respx.post(f"{ANTHROPIC}/v1/messages").mock(return_value=sse_response([overloaded]))
        shim = Shim(anthropic_messages(client=client), MESSAGES, [upstream_for(MESSAGES)])
        ex = await call(shim, MESSAGES.path, json_body=MESSAGES.body(stream=True))
    assert ex.status == 502
    assert ex.json()["error"]["message"] == "the upstream provider failed: busy"
    assert shim.settlement.outcome is not None
    assert shim.settlement.outcome.refunded


# -- every format through respx, the upstream's bytes made by the fake provider ---------------


def fake_upstream(behavior: FakeBehavior) -> Any:
    """A respx side effect answering like the fake provider, one read per SSE event."""
    fake = FakeProvider(behavior=behavior)

    async def respond(request: httpx.Request) -> httpx.Response:
        transport = httpx.ASGITransport(app=fake)
        async with httpx.AsyncClient(transport=transport, base_url="http://fake") as inner:
            answer = await inner.post(
                request.url.path, content=request.content, headers=request.headers
            )
        body = answer.content
        if not answer.headers["content-type"].startswith("text/event-stream"):
            return httpx.Response(answer.status_code, headers=answer.headers, content=body)
        reads = [part + b"\n\n" for part in body.split(b"\n\n") if part]
        return sse_response(reads)

    return respond


SCENARIOS = {
    "ok": FakeBehavior(events=3, input_tokens=9, cache_read_tokens=4, cache_write_tokens=2),
    "no-usage": FakeBehavior(events=3, omit_usage=True),
    "status-429": FakeBehavior(fail_status=429, retry_after="2"),
    "in-band-error": FakeBehavior(events=3, fail_after=1, fail_mode="error"),
}


@pytest.mark.parametrize("fmt", [CHAT, MESSAGES, RESPONSES], ids=lambda f: f.name)
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_each_format_over_respx(
    fmt: Format, stream: bool, scenario: str, client: httpx.AsyncClient
) -> None:
    behavior = SCENARIOS[scenario]
    base = OPENAI if fmt.provider == "openai" else ANTHROPIC
    with respx.mock:
        respx.route(host=httpx.URL(base).host).mock(side_effect=fake_upstream(behavior))
        shim = Shim(endpoint_for(fmt, client), fmt, [upstream_for(fmt)])
        ex = await call(shim, fmt.path, json_body=fmt.body(stream=stream))
    settlement = shim.settlement
    outcome = settlement.outcome
    assert outcome is not None
    if scenario == "ok":
        assert ex.status == 200
        assert settlement.call.status == "success"
        assert settlement.call.usage == behavior.expected_usage(fmt.wire.value)
        assert outcome.charged == PRICE.cost(behavior.expected_usage(fmt.wire.value))
    elif scenario == "no-usage":
        assert ex.status == 200
        assert settlement.call.status == "no_usage"
        assert settlement.output_chars == len(behavior.output_text)
    elif scenario == "status-429":
        assert ex.status == 429
        assert ex.headers["retry-after"] == "2"
        assert outcome.refunded
    elif stream:
        assert ex.status == 200
        assert settlement.call.status == "error"
        assert settlement.committed
        assert settlement.output_chars == len(behavior.piece(0))
    else:  # the in-band knob only affects streams
        assert settlement.call.status == "success"


async def test_returns_when_the_server_never_answers_receive(client: httpx.AsyncClient) -> None:
    # Not every server wakes a pending receive() once the response is sent: the adapter
    # must stop listening for a disconnect by itself.
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(
            return_value=sse_response([content("a"), USAGE, DONE])
        )
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        body = json.dumps(CHAT.body(stream=True)).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await anyio.sleep_forever()
            raise AssertionError  # pragma: no cover

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "headers": [], "path": CHAT.path, "method": "POST"}
        with anyio.fail_after(2):
            await shim(scope, receive, send)
    assert sent[-1] == {"type": "http.response.body", "body": DONE, "more_body": False}
    assert shim.settlement.call.status == "success"


async def test_a_last_event_without_its_blank_line_still_counts(
    client: httpx.AsyncClient,
) -> None:
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(
            return_value=sse_response([content("a"), USAGE, b"data: [DONE]\n"])
        )
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        ex = await call(shim, CHAT.path, json_body=CHAT.body(stream=True))
    assert ex.chunks == [content("a"), b"data: [DONE]\n"]
    assert shim.settlement.call.status == "success"
    assert shim.settlement.call.sent == 2  # settled before the final message


async def test_a_failing_receive_counts_as_a_disconnect(client: httpx.AsyncClient) -> None:
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(
            return_value=sse_response([content("a"), USAGE, DONE])
        )
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        body = json.dumps(CHAT.body(stream=True)).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            raise OSError("connection lost")

        async def send(message: dict[str, Any]) -> None:
            await anyio.sleep(0.01)

        scope = {"type": "http", "headers": [], "path": CHAT.path, "method": "POST"}
        with anyio.fail_after(2):
            await shim(scope, receive, send)
    assert shim.settlement.call.status == "incomplete"


async def test_a_stream_compressed_despite_identity_is_forwarded_readable(
    client: httpx.AsyncClient,
) -> None:
    """The gateway asks for identity; a provider that gzips anyway is decoded (the client
    gets no Content-Encoding header, so it must get plain bytes), as aiohttp does."""
    plain = content("a") + USAGE + DONE
    with respx.mock:
        respx.post(f"{OPENAI}/v1/chat/completions").mock(
            return_value=httpx.Response(
                200,
                headers={"content-type": "text/event-stream", "content-encoding": "gzip"},
                content=gzip.compress(plain),
            )
        )
        shim = Shim(openai_chat_completions(client=client), CHAT, [upstream_for(CHAT)])
        ex = await call(shim, CHAT.path, json_body=CHAT.body(stream=True))
    assert b"".join(ex.chunks) == content("a") + DONE  # the usage chunk hidden, as asked
    assert shim.settlement.call.status == "success"
