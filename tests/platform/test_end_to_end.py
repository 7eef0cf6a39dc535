"""PlatformMode end to end: GatewayMiddleware + the endpoint adapters + the fake provider
(on a real socket) + the fake control plane. Fallback across the resolved attempts happens
before the first chunk and never after; the report names the attempt that served."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gatewaykit.adapters import gateway_routes
from gatewaykit.middleware import GatewayMiddleware
from gatewaykit.modes.platform import ATTEMPT_ID_HEADER, PlatformMode
from gatewaykit.outbox import RetryPolicy, SQLiteOutbox
from gatewaykit.testing import FakeBehavior, FakeControlPlane, FakeProvider, serve_app

from .conftest import GATEWAY_TOKEN, until

pytestmark = pytest.mark.anyio

UPSTREAM_KEY = "sk-upstream-secret"
BEHAVIOR = FakeBehavior(events=4, input_tokens=12)


def attempt(provider: str, base_url: str, **behavior: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"provider": provider, "base_url": base_url, "api_key": UPSTREAM_KEY}
    if behavior:
        spec["headers"] = {"x-fake-behavior": json.dumps(behavior)}
    return spec


@pytest.fixture
async def provider_url() -> AsyncIterator[str]:
    provider = FakeProvider(behavior=BEHAVIOR, api_key=UPSTREAM_KEY)
    async with serve_app(provider) as url:
        yield url


@pytest.fixture
def plane() -> FakeControlPlane:
    plane = FakeControlPlane(gateway_token=GATEWAY_TOKEN)
    plane.add_user("tok-alice", user_id="alice")
    return plane


@pytest.fixture
async def stack(
    plane: FakeControlPlane, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, PlatformMode]]:
    plane_http = httpx.AsyncClient(transport=httpx.ASGITransport(app=plane.app))
    upstream_http = httpx.AsyncClient()
    mode = PlatformMode(
        base_url="http://plane.test",
        gateway_token=GATEWAY_TOKEN,
        client=plane_http,
        outbox=SQLiteOutbox(str(tmp_path / "outbox.db")),
        retry=RetryPolicy(initial_delay=0.02, max_delay=0.1),
    )
    app = GatewayMiddleware(Starlette(routes=gateway_routes(client=upstream_http)), mode=mode)
    async with (
        plane_http,
        upstream_http,
        mode,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://gw.test",
            headers={"authorization": "Bearer tok-alice"},
        ) as gateway,
    ):
        yield gateway, mode


async def the_report(mode: PlatformMode, plane: FakeControlPlane) -> dict[str, Any]:
    mode.sender.notify()
    await until(lambda: plane.reports)
    [(key, report)] = plane.reports.items()
    assert key == f"{report['request_id']}:{report['attempt_id']}"
    return report


def chat(stream: bool) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "stream": stream,
        "messages": [{"role": "user", "content": "hello"}],
    }


def message(stream: bool) -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "stream": stream,
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hello"}],
    }


@pytest.mark.parametrize("stream", [True, False])
async def test_falls_back_before_the_first_chunk_and_reports_the_serving_attempt(
    stack: tuple[httpx.AsyncClient, PlatformMode],
    plane: FakeControlPlane,
    provider_url: str,
    stream: bool,
) -> None:
    gateway, mode = stack
    plane.set_attempts(
        "gpt-4o-mini",
        attempt("openai", f"{provider_url}/v1", fail_status=503),
        attempt("openai", f"{provider_url}/v1", fail_status=429),
        attempt("openai", f"{provider_url}/v1"),
    )
    response = await gateway.post("/v1/chat/completions", json=chat(stream))
    assert response.status_code == 200, response.text
    report = await the_report(mode, plane)
    assert response.headers[ATTEMPT_ID_HEADER] == report["attempt_id"]
    assert response.headers["x-request-id"] == report["request_id"]
    assert report["attempt_id"] == "att_3"  # the third attempt served
    assert report["status"] == "success"
    assert report["usage_source"] == "provider"
    assert report["usage"]["input_tokens"] == 12
    assert report["usage"]["output_tokens"] == 4
    assert UPSTREAM_KEY not in response.text
    if stream:
        assert "tok3" in response.text
    assert len(plane.usage_posts) == 1  # one report per request, for the attempt that served


async def test_no_fallback_after_the_first_chunk(
    stack: tuple[httpx.AsyncClient, PlatformMode],
    plane: FakeControlPlane,
    provider_url: str,
) -> None:
    gateway, mode = stack
    plane.set_attempts(
        "claude-haiku-4-5",
        attempt("anthropic", provider_url, fail_after=2, fail_mode="drop"),
        attempt("anthropic", provider_url),
    )
    response = await gateway.post("/v1/messages", json=message(stream=True))
    assert response.status_code == 200  # the stream had started
    assert "tok1" in response.text
    assert "tok3" not in response.text  # the second attempt was never used
    report = await the_report(mode, plane)
    assert response.headers[ATTEMPT_ID_HEADER] == report["attempt_id"] == "att_1"
    assert report["status"] == "error"
    assert report["observed"]["committed"] is True
    # Anthropic's message_start already reported the prompt: partial usage is kept.
    assert report["usage"]["input_tokens"] == 12
    assert report["usage_source"] == "partial"


async def test_all_attempts_fail_reports_the_last_one_tried(
    stack: tuple[httpx.AsyncClient, PlatformMode],
    plane: FakeControlPlane,
    provider_url: str,
) -> None:
    gateway, mode = stack
    plane.set_attempts(
        "gpt-4o-mini",
        attempt("openai", f"{provider_url}/v1", fail_status=503),
        attempt("openai", f"{provider_url}/v1", fail_status=500),
    )
    response = await gateway.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code >= 500
    report = await the_report(mode, plane)
    assert report["status"] == "error"
    assert report["usage"] is None
    assert report["observed"]["committed"] is False
    assert response.headers[ATTEMPT_ID_HEADER] == report["attempt_id"]
    assert report["attempt_id"] == "att_2"  # the last one tried


async def test_official_sdks_through_platform_mode(
    plane: FakeControlPlane, provider_url: str, tmp_path: Path
) -> None:
    """The official clients stream through a fallback, and parse relayed refusals."""
    import anthropic
    import httpx2
    import openai

    plane.add_user("tok-slow", user_id="slow", retry_after=3)
    plane.set_attempts(
        "gpt-4o-mini",
        attempt("openai", f"{provider_url}/v1", fail_status=502),
        attempt("openai", f"{provider_url}/v1"),
    )
    plane.set_attempts("claude-haiku-4-5", attempt("anthropic", provider_url))
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=plane.app)) as plane_http,
        httpx2.AsyncClient() as upstream_http,
    ):
        mode = PlatformMode(
            base_url="http://plane.test",
            gateway_token=GATEWAY_TOKEN,
            client=plane_http,
            outbox=SQLiteOutbox(str(tmp_path / "outbox.db")),
        )
        app = GatewayMiddleware(Starlette(routes=gateway_routes(client=upstream_http)), mode=mode)
        async with mode, httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)) as http:
            oai = openai.AsyncOpenAI(
                api_key="tok-alice", base_url="http://gw.test/v1", http_client=http, max_retries=0
            )
            chunks = await oai.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            assert text == BEHAVIOR.output_text
            bad = openai.AsyncOpenAI(
                api_key="tok-nobody", base_url="http://gw.test/v1", http_client=http, max_retries=0
            )
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model="gpt-4o-mini", messages=[])
            ant = anthropic.AsyncAnthropic(
                api_key="tok-slow", base_url="http://gw.test", http_client=http, max_retries=0
            )
            with pytest.raises(anthropic.RateLimitError) as caught:
                await ant.messages.create(
                    model="claude-haiku-4-5",
                    max_tokens=5,
                    messages=[{"role": "user", "content": "hi"}],
                )
            assert caught.value.response.headers["retry-after"] == "3"
            mode.sender.notify()
            await until(lambda: plane.reports)
    [report] = plane.reports.values()
    assert report["status"] == "success"
    assert report["usage"]["output_tokens"] == BEHAVIOR.events


async def test_embeddings_and_count_tokens_in_platform_mode(
    stack: tuple[httpx.AsyncClient, PlatformMode], plane: FakeControlPlane, provider_url: str
) -> None:
    """Embeddings are resolved and reported like any call; count_tokens too, but with an
    estimate of 0 and zero usage (the provider does not bill it)."""
    gateway, mode = stack
    plane.set_attempts("text-embedding-3-small", attempt("openai", f"{provider_url}/v1"))
    plane.set_attempts("claude-haiku-4-5", attempt("anthropic", provider_url))
    body = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    embedded = await gateway.post("/v1/embeddings", json=body)
    assert embedded.status_code == 200, embedded.text
    report = await the_report(mode, plane)
    assert (report["status"], report["usage"]["input_tokens"]) == ("success", 24)
    plane.reports.clear()
    count = {"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]}
    counted = await gateway.post("/v1/messages/count_tokens", json=count)
    assert counted.json() == {"input_tokens": 12}
    [embed_resolve, count_resolve] = plane.resolve_calls
    assert embed_resolve["endpoint"] == "embeddings"
    assert (count_resolve["endpoint"], count_resolve["estimate_usd"]) == (
        "messages.count_tokens",
        "0",
    )
    report = await the_report(mode, plane)
    assert report["status"] == "success"
    assert report["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
    }


async def test_models_are_not_listed_in_platform_mode(
    stack: tuple[httpx.AsyncClient, PlatformMode], plane: FakeControlPlane
) -> None:
    """The control plane owns keys and models; the protocol has no listing call."""
    gateway, _ = stack
    answer = await gateway.get("/v1/models")
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == "this gateway does not list models"
    answer = await gateway.get("/v1/models/gpt-4o", headers={"anthropic-version": "2023-06-01"})
    assert answer.json()["type"] == "error"
    assert plane.resolve_calls == []
