"""OpenTelemetry spans of gated requests, read from the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ErrorKind
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.observability import OpenTelemetryTracing
from gatewaykit.settlement import RequestEstimate, SettlementOutcome
from gatewaykit.testing import FakeProvider, RecordingSettlement
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage
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


async def test_under_an_outer_server_span_the_request_span_is_its_child(
    build: Build,
    ledger: SQLiteLedger,
    tracing: OpenTelemetryTracing,
    exporter: InMemorySpanExporter,
) -> None:
    key, _ = await new_key(ledger)
    with tracing.tracer.start_as_current_span("POST /v1/chat/completions") as outer:
        async with sdk(build(tracing=tracing), key) as client:
            await client.chat.completions.create(model="test-model", messages=MESSAGES)
    [root] = by_name(exporter.get_finished_spans())["gatewaykit.request"]
    assert root.kind is SpanKind.INTERNAL
    assert root.parent is not None
    assert root.parent.span_id == outer.get_span_context().span_id


def unit_context(amount: str) -> GatewayContext:
    estimate = RequestEstimate(prompt_tokens=1, max_output_tokens=1, amount=Decimal(amount))
    settlement = RecordingSettlement(estimate=estimate)
    return GatewayContext("req_1", settlement, WireFormat.OPENAI_EMBEDDINGS, "m", False, {})


def test_a_failed_settlement_an_overrun_and_a_5xx_are_marked(
    tracing: OpenTelemetryTracing, exporter: InMemorySpanExporter
) -> None:
    trace = tracing.start("/v1/embeddings", {})
    trace.admitting()
    context = unit_context("0.001")
    trace.admitted(context)
    trace.attempt(Attempt("1", Upstream("https://api.example.com/v1"), "m"))
    trace.settling()
    trace.settled(None, Decimal("0.001"), None)  # the ledger failed; a later hook retries
    trace.settling()
    usage = Usage(input_tokens=5, cache_read_tokens=3, cache_write_tokens=2)
    outcome = SettlementOutcome("error", Decimal("0.003"), usage, False, recorded=False)
    trace.settled(outcome, Decimal("0.001"), "resp_1")
    trace.finished(502)
    named = by_name(exporter.get_finished_spans())
    first, second = named["gatewaykit.settlement"]
    assert first.status.status_code is StatusCode.ERROR
    assert second.status.status_code is StatusCode.ERROR  # not recorded
    [root] = named["gatewaykit.request"]
    attrs = dict(root.attributes or {})
    assert attrs["gen_ai.operation.name"] == "embeddings"
    assert attrs["gatewaykit.overrun_usd"] == pytest.approx(0.002)
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 3
    assert attrs["gen_ai.usage.cache_creation.input_tokens"] == 2
    assert attrs["gen_ai.response.id"] == "resp_1"
    assert root.status.status_code is StatusCode.ERROR
    [attempt] = named["embeddings m"]
    assert attempt.status.status_code is StatusCode.ERROR
    assert dict(attempt.attributes or {})["server.port"] == 443
    assert "OpenTelemetryTracing" in repr(tracing)


def test_an_interrupted_request_ends_every_span_it_opened(
    tracing: OpenTelemetryTracing, exporter: InMemorySpanExporter
) -> None:
    trace = tracing.start("/v1/chat/completions", {})
    trace.activate()
    trace.admitting()
    trace.refused(ErrorKind.UNAVAILABLE)
    trace.finished(503)
    other = tracing.start("/v1/chat/completions", {})
    other.admitting()
    other.admitted(unit_context("0"))
    other.attempt(Attempt("1", Upstream("http://127.0.0.1:9/v1"), "m"))
    other.settling()
    other.finished(0)  # cancelled mid-way: nothing is left open
    names = [span.name for span in exporter.get_finished_spans()]
    assert sorted(names) == sorted(
        ["gatewaykit.admission", "gatewaykit.request"] * 2
        + ["embeddings m", "gatewaykit.settlement"]
    )
    refused = next(s for s in exporter.get_finished_spans() if s.name == "gatewaykit.request")
    assert refused.status.status_code is StatusCode.ERROR
    assert dict(refused.attributes or {})["gatewaykit.denial_reason"] == "unavailable"


class BrokenTracing:
    """A tracing whose every span operation fails."""

    def start(self, route: str, headers: object) -> BrokenTracing:
        return self

    def __getattr__(self, name: str) -> Any:
        def fail(*args: object) -> None:
            raise RuntimeError("bug in the tracer")

        return fail


async def test_a_tracer_that_raises_breaks_no_request(
    build: Build, ledger: SQLiteLedger, caplog: pytest.LogCaptureFixture
) -> None:
    key, _ = await new_key(ledger)
    broken: Any = BrokenTracing()
    async with sdk(build(tracing=broken), key) as client:
        await client.chat.completions.create(model="test-model", messages=MESSAGES)
    [record] = await ledger.usage()
    assert record.status == "success"
    failures = [r for r in caplog.records if "metrics or tracing failed" in r.getMessage()]
    # activate, admitting, admitted, attempt, inject, settling, settled, finished
    assert len(failures) == 8
    async with sdk(build(tracing=broken), "gk_nope") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="test-model", messages=MESSAGES)
