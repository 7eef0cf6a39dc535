"""OpenTelemetry spans of gated requests, read from the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.observability import OpenTelemetryTracing
from gatewaykit.testing import FakeProvider
from gatewaykit.upstream import Upstream
from tests.observability.conftest import Build
from tests.scenarios.conftest import UPSTREAM_KEY, new_key

pytestmark = pytest.mark.anyio

PROMPT = "the secret plans for tuesday"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    yield memory
    memory.shutdown()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> OpenTelemetryTracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryTracing(provider)


def sdk(app: Any, key: str) -> openai.AsyncOpenAI:
    """The official SDK calling the app in-process (the app has finished when it returns)."""
    transport = httpx2.ASGITransport(app=app)
    http = httpx2.AsyncClient(transport=transport)
    return openai.AsyncOpenAI(
        base_url="http://gateway/v1", api_key=key, max_retries=0, http_client=http
    )


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


async def test_span_tree_genai_attributes_and_traceparent_upstream(
    build: Build,
    ledger: SQLiteLedger,
    provider: tuple[FakeProvider, str],
    tracing: OpenTelemetryTracing,
    exporter: InMemorySpanExporter,
) -> None:
    fake, _ = provider
    key, _ = await new_key(ledger)
    async with sdk(build(tracing=tracing), key) as client:
        stream = await client.chat.completions.create(
            model="test-model",
            messages=MESSAGES,
            stream=True,
            extra_headers={"traceparent": TRACEPARENT},
        )
        async for _ in stream:
            pass
    [record] = await ledger.usage()

    named = by_name(exporter.get_finished_spans())
    assert sorted(named) == [
        "chat test-model",
        "gatewaykit.admission",
        "gatewaykit.request",
        "gatewaykit.settlement",
    ]
    [root] = named["gatewaykit.request"]
    [admission] = named["gatewaykit.admission"]
    [attempt] = named["chat test-model"]
    [settlement] = named["gatewaykit.settlement"]
    assert root.context is not None
    assert root.parent is not None
    assert format(root.context.trace_id, "032x") == TRACE_ID  # the client's trace continues
    assert format(root.parent.span_id, "016x") == "b7ad6b7169203331"
    assert root.kind is SpanKind.SERVER
    for child in (admission, attempt, settlement):
        assert child.parent is not None
        assert child.parent.span_id == root.context.span_id
    assert attempt.kind is SpanKind.CLIENT

    attrs = dict(root.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "test-model"
    assert attrs["gen_ai.response.model"] == "test-model"
    assert attrs["gen_ai.usage.input_tokens"] == record.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == record.output_tokens
    assert attrs["gatewaykit.cost_usd"] == float(record.cost)
    assert attrs["gatewaykit.usage_source"] == "provider"
    assert attrs["gatewaykit.outcome"] == "success"
    hold = attrs["gatewaykit.hold_usd"]
    assert isinstance(hold, float)
    assert hold > 0
    assert attrs["http.response.status_code"] == 200
    attempt_attrs = dict(attempt.attributes or {})
    assert attempt_attrs["gen_ai.provider.name"] == "openai"
    assert attempt_attrs["server.address"] == "127.0.0.1"
    assert attempt_attrs["gen_ai.usage.output_tokens"] == record.output_tokens
    assert dict(settlement.attributes or {})["gatewaykit.cost_usd"] == float(record.cost)

    # The upstream request carried the attempt span's context.
    [upstream] = fake.requests
    assert attempt.context is not None
    assert upstream.headers["traceparent"] == f"00-{TRACE_ID}-{attempt.context.span_id:016x}-01"

    # Nothing of the conversation and no credential in any attribute.
    for span in exporter.get_finished_spans():
        for value in (span.attributes or {}).values():
            text = str(value)
            assert PROMPT not in text
            assert key not in text
            assert UPSTREAM_KEY not in text
        for event in span.events:
            assert PROMPT not in str(event.attributes)


async def test_a_failed_attempt_and_its_fallback_are_two_client_spans(
    build: Build,
    ledger: SQLiteLedger,
    provider: tuple[FakeProvider, str],
    tracing: OpenTelemetryTracing,
    exporter: InMemorySpanExporter,
) -> None:
    _, url = provider
    key, _ = await new_key(ledger)
    configured = [
        Upstream("http://127.0.0.1:1/v1", provider="openai", name="down"),
        Upstream(f"{url}/v1", api_key=UPSTREAM_KEY, provider="openai", name="up"),
    ]
    async with sdk(build(tracing=tracing, configured=configured), key) as client:
        await client.chat.completions.create(model="test-model", messages=MESSAGES)
    first, second = sorted(
        by_name(exporter.get_finished_spans())["chat test-model"], key=lambda s: s.start_time or 0
    )
    assert first.status.status_code is StatusCode.ERROR
    assert dict(first.attributes or {})["gatewaykit.attempt_id"] == "1"
    assert second.status.status_code is StatusCode.UNSET
    assert dict(second.attributes or {})["gatewaykit.attempt_id"] == "2"
    assert "gen_ai.usage.input_tokens" in dict(second.attributes or {})


async def test_a_refused_request_has_its_admission_span_and_reason(
    build: Build, tracing: OpenTelemetryTracing, exporter: InMemorySpanExporter
) -> None:
    async with sdk(build(tracing=tracing), "gk_not_a_key") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="test-model", messages=MESSAGES)
    named = by_name(exporter.get_finished_spans())
    assert sorted(named) == ["gatewaykit.admission", "gatewaykit.request"]
    [root] = named["gatewaykit.request"]
    attrs = dict(root.attributes or {})
    assert attrs["gatewaykit.outcome"] == "refused"
    assert attrs["gatewaykit.denial_reason"] == "auth"
    assert attrs["http.response.status_code"] == 401
    assert root.parent is None  # no traceparent: a new trace


def test_neither_library_is_imported_unless_configured() -> None:
    code = (
        "import sys, gatewaykit, gatewaykit.observability\n"
        "from gatewaykit.middleware import GatewayMiddleware\n"
        "from gatewaykit.observability import HealthApp, MetricsRecorder\n"
        "class Mode:\n"
        "    async def resolve(self, request): ...\n"
        "GatewayMiddleware(lambda *a: None, mode=Mode())\n"
        "loaded = [m for m in sys.modules if m.startswith(('opentelemetry', 'prometheus'))]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_a_responses_request_names_the_response_it_created(
    build: Build,
    ledger: SQLiteLedger,
    tracing: OpenTelemetryTracing,
    exporter: InMemorySpanExporter,
) -> None:
    key, _ = await new_key(ledger)
    async with sdk(build(tracing=tracing), key) as client:
        answer = await client.responses.create(model="test-model", input=PROMPT)
    [root] = by_name(exporter.get_finished_spans())["gatewaykit.request"]
    attrs = dict(root.attributes or {})
    assert attrs["gen_ai.response.id"] == answer.id
    assert attrs["http.route"] == "/v1/responses"
