"""Official openai and anthropic SDKs as clients of the adapters on a real uvicorn server,
in front of the fake provider on another socket. Also: the adapters on an httpx2 client."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam
from starlette.applications import Starlette
from starlette.routing import Route

from gatewaykit.adapters import default_client, gateway_routes
from gatewaykit.testing import FakeProvider
from tests.adapters.conftest import (
    BEHAVIOR,
    CHAT,
    MESSAGES,
    RESPONSES,
    Format,
    Shim,
    behavior_header,
    serve,
)
from tests.asgi import call

pytestmark = pytest.mark.anyio


class Gateway:
    """A Starlette app with the three adapters, each behind a Shim."""

    def __init__(self, client: Any, provider_url: str, **options: Any) -> None:
        self.provider_url = provider_url
        self.behavior: dict[str, Any] = {}
        self.shims: dict[str, Shim] = {}
        routes = []
        formats = {CHAT.path: CHAT, MESSAGES.path: MESSAGES, RESPONSES.path: RESPONSES}
        for route in gateway_routes(client=client, **options):
            if route.path not in formats:
                continue  # the other endpoints are tested with the middleware (test_endpoints)
            fmt = formats[route.path]
            shim = Shim(route.endpoint, fmt, [])
            self.shims[fmt.name] = shim
            routes.append(Route(route.path, shim, methods=["POST"]))
        self.app = Starlette(routes=routes)

    def configure(self, **behavior: Any) -> None:
        """Make the fake provider behave like this for every later request."""
        for shim in self.shims.values():
            headers = behavior_header(**behavior) if behavior else {}
            shim.upstreams = [
                shim.fmt.upstream(self.provider_url, api_key="sk-upstream", headers=headers)
            ]
            shim.settlements.clear()


@pytest.fixture(scope="module")
async def gateway_server(
    provider_server: tuple[FakeProvider, str],
) -> AsyncIterator[tuple[Gateway, str]]:
    _, provider_url = provider_server
    async with default_client() as client:
        gateway = Gateway(client, provider_url)
        async with serve(gateway.app) as url:
            yield gateway, url


@pytest.fixture
def gateway(
    gateway_server: tuple[Gateway, str], provider: tuple[FakeProvider, str]
) -> tuple[Gateway, str]:
    gw, url = gateway_server
    gw.configure()
    return gw, url


def openai_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="gk-client", max_retries=0)


def anthropic_client(url: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=url, api_key="gk-client", max_retries=0)


CHAT_MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
MESSAGES_PARAM: list[MessageParam] = [{"role": "user", "content": "hello"}]


async def test_openai_chat_stream_and_non_stream(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    async with openai_client(url) as client:
        completion = await client.chat.completions.create(model="m", messages=CHAT_MESSAGES)
        assert completion.choices[0].message.content == BEHAVIOR.output_text
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == 23
        stream = await client.chat.completions.create(
            model="m", messages=CHAT_MESSAGES, stream=True
        )
        pieces = []
        async for chunk in stream:
            assert chunk.usage is None  # the injected usage chunk is hidden
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == BEHAVIOR.output_text
    calls = [s.call for s in gw.shims["chat"].settlements]
    assert [c.status for c in calls] == ["success", "success"]
    assert all(c.usage == CHAT.expected() for c in calls)


async def test_openai_responses_stream_and_non_stream(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    async with openai_client(url) as client:
        response = await client.responses.create(model="m", input="hello")
        assert response.output_text == BEHAVIOR.output_text
        stream = await client.responses.create(model="m", input="hello", stream=True)
        types = [event.type async for event in stream]
    assert types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == BEHAVIOR.events
    calls = [s.call for s in gw.shims["responses"].settlements]
    assert all(c.status == "success" and c.usage == RESPONSES.expected() for c in calls)


async def test_anthropic_messages_stream_and_non_stream(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    async with anthropic_client(url) as client:
        message = await client.messages.create(model="m", max_tokens=50, messages=MESSAGES_PARAM)
        assert message.usage.input_tokens == BEHAVIOR.input_tokens
        async with client.messages.stream(
            model="m", max_tokens=50, messages=MESSAGES_PARAM
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert text == BEHAVIOR.output_text
    assert final.usage.output_tokens == BEHAVIOR.events
    calls = [s.call for s in gw.shims["messages"].settlements]
    assert all(c.status == "success" and c.usage == MESSAGES.expected() for c in calls)


@pytest.mark.parametrize(
    ("status", "openai_error", "anthropic_error"),
    [
        (400, openai.BadRequestError, anthropic.BadRequestError),
        (402, openai.APIStatusError, anthropic.APIStatusError),
        (404, openai.NotFoundError, anthropic.NotFoundError),
        (429, openai.RateLimitError, anthropic.RateLimitError),
        (401, openai.InternalServerError, anthropic.InternalServerError),  # → 502
        (500, openai.InternalServerError, anthropic.InternalServerError),
    ],
)
async def test_sdk_error_classes_for_upstream_failures(
    gateway: tuple[Gateway, str],
    status: int,
    openai_error: type[openai.APIStatusError],
    anthropic_error: type[anthropic.APIStatusError],
) -> None:
    gw, url = gateway
    gw.configure(fail_status=status, retry_after="1")
    async with openai_client(url) as client:
        with pytest.raises(openai_error) as caught:
            await client.chat.completions.create(model="m", messages=CHAT_MESSAGES, stream=True)
        assert caught.value.status_code == (502 if status == 401 else status)
        with pytest.raises(openai_error):
            await client.responses.create(model="m", input="x")
    async with anthropic_client(url) as anthropic_sdk:
        with pytest.raises(anthropic_error) as caught_a:
            await anthropic_sdk.messages.create(model="m", max_tokens=5, messages=MESSAGES_PARAM)
        assert caught_a.value.status_code == (502 if status == 401 else status)
    for shim in gw.shims.values():
        for settlement in shim.settlements:
            assert settlement.call.status == "error"
            assert settlement.outcome is not None
            assert settlement.outcome.refunded


async def drain_anthropic(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(model="m", max_tokens=5, messages=MESSAGES_PARAM) as s:
        async for _ in s:
            pass


async def drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


async def test_sdk_sees_a_mid_stream_failure_as_an_error(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    gw.configure(fail_after=2, fail_mode="drop")
    async with anthropic_client(url) as client:
        with pytest.raises(anthropic.APIStatusError, match=r"api_error|failed"):
            await drain_anthropic(client)
    async with openai_client(url) as oai:
        stream = await oai.chat.completions.create(model="m", messages=CHAT_MESSAGES, stream=True)
        with pytest.raises(openai.APIError):
            await drain(stream)


async def test_events_arrive_one_by_one(gateway: tuple[Gateway, str]) -> None:
    gw, url = gateway
    gap = 0.08
    gw.configure(delay=gap, events=5)
    arrivals: list[float] = []
    async with openai_client(url) as client:
        start = time.monotonic()
        stream = await client.chat.completions.create(
            model="m", messages=CHAT_MESSAGES, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic() - start)
    async with anthropic_client(url) as anthropic_sdk:
        start = time.monotonic()
        async with anthropic_sdk.messages.stream(
            model="m", max_tokens=5, messages=MESSAGES_PARAM
        ) as s:
            async for _ in s.text_stream:
                arrivals.append(time.monotonic() - start)
    for series in (arrivals[:5], arrivals[5:]):
        assert len(series) == 5
        gaps = [b - a for a, b in itertools.pairwise(series)]
        # Not buffered into one burst (one gap may shrink if a busy machine stalls a read).
        assert sum(g > gap * 0.5 for g in gaps) >= len(gaps) - 1, gaps


async def test_adapters_work_unchanged_on_an_httpx2_client(
    fmt: Format, provider: tuple[FakeProvider, str]
) -> None:
    _, url = provider
    async with httpx2.AsyncClient() as client:
        routes = {r.path: r.endpoint for r in gateway_routes(client=client, read_timeout=0.3)}
        ok = fmt.upstream(url, api_key="sk-upstream")
        shim = Shim(routes[fmt.path], fmt, [ok])
        ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
        assert ex.status == 200
        assert shim.settlement.call.usage == fmt.expected()
        shim = Shim(routes[fmt.path], fmt, [ok])
        ex = await call(shim, fmt.path, json_body=fmt.body(stream=False))
        assert shim.settlement.call.usage == fmt.expected()
        # httpx2's exceptions are classified like httpx's.
        shim = Shim(routes[fmt.path], fmt, [fmt.upstream("http://127.0.0.1:9")])
        ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
        assert ex.status == 502
        slow = fmt.upstream(url, api_key="sk-upstream", headers=behavior_header(first_byte_delay=2))
        shim = Shim(routes[fmt.path], fmt, [slow])
        ex = await call(shim, fmt.path, json_body=fmt.body(stream=True))
        assert ex.status == 504
