"""Prometheus metrics of the real stack, driven by the official SDKs over uvicorn."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client import CollectorRegistry

from gatewaykit import GatewayMiddleware, StandaloneMode
from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.observability import MetricsApp, MultiprocessPrometheusMetrics, PrometheusMetrics
from gatewaykit.observability.prometheus import OTHER_MODEL
from gatewaykit.outbox.sqlite import SQLiteOutbox
from gatewaykit.settlement import SettlementOutcome
from gatewaykit.testing import FakeBehavior, FakeProvider
from gatewaykit.usage import Usage, UsageSource
from tests.adapters.conftest import serve
from tests.asgi import call
from tests.observability.conftest import Build, sample, scrape
from tests.scenarios.conftest import new_key

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
Metrics = type[PrometheusMetrics] | type[MultiprocessPrometheusMetrics]


@pytest.fixture(params=[PrometheusMetrics, MultiprocessPrometheusMetrics])
def kind(request: pytest.FixtureRequest) -> Metrics:
    """Both recorders: the one-process collector and prometheus_client's own objects."""
    return request.param  # type: ignore[no-any-return]


HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


async def test_money_outcomes_and_denials_match_the_ledger(
    build: Build, ledger: SQLiteLedger, kind: Metrics
) -> None:
    metrics = kind()
    key, _ = await new_key(ledger)
    broke, broke_record = await new_key(ledger, user="bob")
    await ledger.set_budget(f"key:{broke_record.key_id}", limit=Decimal(0))
    async with serve(build(metrics=metrics)) as url:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0) as chat:
            stream = await chat.chat.completions.create(
                model="test-model", messages=HELLO, stream=True
            )
            async for _ in stream:
                pass
            await chat.chat.completions.create(model="test-model", messages=HELLO)
            await chat.responses.create(model="test-model", input="hello")
        async with anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0) as claude:
            hello: list[MessageParam] = [{"role": "user", "content": "hello"}]
            stream_manager = claude.messages.stream(
                model="test-model", max_tokens=64, messages=hello
            )
            async with stream_manager as answer:
                await answer.get_final_message()
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="gk_no", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model="test-model", messages=HELLO)
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=broke, max_retries=0) as poor:
            with pytest.raises(openai.APIStatusError) as denied:
                await poor.chat.completions.create(model="test-model", messages=HELLO)
        assert denied.value.status_code == 402
        # Read while the server still runs: everything was counted before the last byte.
        samples = await scrape(metrics)

    records = await ledger.usage()
    assert len(records) == 4
    spent = sum((r.cost for r in records), Decimal(0))
    assert spent > 0
    assert sample(samples, "gatewaykit_cost_usd_total", model="test-model") == pytest.approx(
        float(spent), rel=1e-12
    )
    assert (
        f"{sample(samples, 'gatewaykit_cost_usd_total', model='test-model'):.9f}" == f"{spent:.9f}"
    )
    tokens: dict[str, int] = defaultdict(int)
    for record in records:
        tokens["input"] += record.input_tokens
        tokens["output"] += record.output_tokens
    for token_kind, count in tokens.items():
        labels = {"model": "test-model", "kind": token_kind}
        assert sample(samples, "gatewaykit_tokens_total", **labels) == count
    per_route = {CHAT: 2, "/v1/responses": 1, "/v1/messages": 1}
    for route, count in per_route.items():
        assert (
            sample(
                samples,
                "gatewaykit_requests_total",
                route=route,
                model="test-model",
                outcome="success",
            )
            == count
        )
    assert (
        sample(samples, "gatewaykit_requests_total", route=CHAT, model="", outcome="refused") == 2
    )
    assert sample(samples, "gatewaykit_denials_total", route=CHAT, reason="auth") == 1
    assert sample(samples, "gatewaykit_denials_total", route=CHAT, reason="budget") == 1
    assert sample(samples, "gatewaykit_usage_source_total", source="provider") == 4
    assert sample(samples, "gatewaykit_overrun_usd_total", model="test-model") == 0
    assert sample(samples, "gatewaykit_holds_live") == 0
    assert sample(samples, "gatewaykit_held_usd") == 0
    assert sample(samples, "gatewaykit_upstream_first_byte_seconds_count", route=CHAT) == 2
    assert sample(samples, "gatewaykit_ledger_seconds_count", op="settle") == 4
    assert sample(samples, "gatewaykit_ledger_seconds_count", op="admit") == 6
    # request_seconds is observed once the response is done: at most a moment later.
    total = sum(
        value for (name, _), value in samples.items() if name == "gatewaykit_request_seconds_count"
    )
    assert total in (5, 6)


async def test_a_client_that_leaves_is_counted_incomplete_and_its_hold_closed(
    build: Build, ledger: SQLiteLedger, provider: tuple[FakeProvider, str], kind: Metrics
) -> None:
    fake, _ = provider
    fake.behavior = FakeBehavior(events=50, delay=0.01)
    metrics = kind()
    key, _ = await new_key(ledger)
    body = {"model": "test-model", "messages": HELLO, "stream": True}
    exchange = await call(
        build(metrics=metrics),
        CHAT,
        json_body=body,
        headers={"authorization": f"Bearer {key}"},
        disconnect=lambda sent: len(sent) >= 3,  # start, then two chunks
    )
    assert exchange.status == 200
    samples = await scrape(metrics)
    [record] = await ledger.usage()
    assert record.status == "incomplete"
    labels = {"route": CHAT, "model": "test-model"}
    assert sample(samples, "gatewaykit_requests_total", outcome="incomplete", **labels) == 1
    assert sample(samples, "gatewaykit_cost_usd_total", model="test-model") == float(record.cost)
    assert sample(samples, "gatewaykit_holds_live") == 0
    assert sample(samples, "gatewaykit_request_seconds_count", route=CHAT) == 1


async def test_an_unreachable_upstream_is_an_error_refunded(
    build: Build, ledger: SQLiteLedger, kind: Metrics
) -> None:
    metrics = kind()
    key, _ = await new_key(ledger)
    app = build(metrics=metrics, base="http://127.0.0.1:1")
    body = {"model": "test-model", "messages": HELLO}
    exchange = await call(app, CHAT, json_body=body, headers={"authorization": f"Bearer {key}"})
    assert exchange.status == 502
    samples = await scrape(metrics)
    labels = {"route": CHAT, "model": "test-model"}
    assert sample(samples, "gatewaykit_requests_total", outcome="error", **labels) == 1
    assert sample(samples, "gatewaykit_cost_usd_total", model="test-model") == 0
    assert sample(samples, "gatewaykit_usage_source_total", source="none") == 1
    assert sample(samples, "gatewaykit_holds_live") == 0
    assert sample(samples, "gatewaykit_denials_total", route=CHAT, reason="unavailable") == 0


def outcome(charged: str, usage: Usage | None = None) -> SettlementOutcome:
    return SettlementOutcome("success", Decimal(charged), usage, refunded=False)


async def test_overrun_is_what_was_charged_beyond_the_hold(kind: Metrics) -> None:
    metrics = kind()
    metrics.admitted(CHAT, "m", Decimal("0.2"), 0.001)
    metrics.admitted(CHAT, "m", Decimal("0.000000001"), 0.001)
    samples = await scrape(metrics)
    assert sample(samples, "gatewaykit_holds_live") == 2
    assert sample(samples, "gatewaykit_held_usd") == pytest.approx(0.200000001)
    usage = Usage(
        input_tokens=3, cache_read_tokens=5, cache_write_tokens=7, source=UsageSource.ESTIMATED
    )
    metrics.settled(CHAT, "m", Decimal("0.2"), outcome("0.5", usage), 0.001)
    metrics.settled(CHAT, "m", Decimal("0.000000001"), outcome("0"), 0.001)
    samples = await scrape(metrics)
    assert sample(samples, "gatewaykit_overrun_usd_total", model="m") == pytest.approx(0.3)
    assert sample(samples, "gatewaykit_cost_usd_total", model="m") == pytest.approx(0.5)
    assert sample(samples, "gatewaykit_tokens_total", model="m", kind="cache_read") == 5
    assert sample(samples, "gatewaykit_tokens_total", model="m", kind="cache_write") == 7
    assert sample(samples, "gatewaykit_usage_source_total", source="estimated") == 1
    assert sample(samples, "gatewaykit_usage_source_total", source="none") == 1
    assert sample(samples, "gatewaykit_holds_live") == 0
    assert sample(samples, "gatewaykit_held_usd") == 0


async def test_model_names_beyond_the_limit_are_counted_as_other(kind: Metrics) -> None:
    metrics = kind(max_models=2)
    for model in ("a", "b", "c", "d", "a"):
        metrics.admitted(CHAT, model, Decimal(1), 0.0)
        metrics.settled(CHAT, model, Decimal(1), outcome("1"), 0.0)
    samples = await scrape(metrics)
    costs = {
        dict(labels)["model"]: value
        for (name, labels), value in samples.items()
        if name == "gatewaykit_cost_usd_total"
    }
    assert costs == {"a": 2, "b": 1, OTHER_MODEL: 2}


async def test_outbox_gauges_are_read_at_scrape_time() -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    async with SQLiteOutbox(":memory:") as outbox:
        metrics.watch_outbox(outbox)
        samples = await scrape(metrics)
        assert sample(samples, "gatewaykit_outbox_pending") == 0
        await outbox.enqueue("r1:1", {"n": 1})
        await outbox.enqueue("r2:1", {"n": 2})
        await outbox.park("r2:1", error="refused")
        samples = await scrape(metrics)
    assert sample(samples, "gatewaykit_outbox_pending") == 1  # the parked one is dead
    assert sample(samples, "gatewaykit_outbox_dead_letters") == 1
    assert sample(samples, "gatewaykit_outbox_oldest_seconds") >= 0


def test_max_models_must_be_positive() -> None:
    with pytest.raises(ConfigurationError):
        PrometheusMetrics(max_models=0)


def test_metrics_must_be_a_recorder() -> None:
    mode = StandaloneMode(SQLiteLedger(":memory:"), prices={}, upstreams=[])
    not_a_recorder: Any = object()
    with pytest.raises(ConfigurationError, match="MetricsRecorder"):
        GatewayMiddleware(not_a_recorder, mode=mode, metrics=not_a_recorder)


class Recorder:
    """A MetricsRecorder of its own: remembers the calls, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def refused(self, route: str, reason: str, admit_seconds: float | None) -> None:
        self.calls.append(("refused", route, reason, admit_seconds is not None))

    def admitted(self, route: str, model: str, held: Decimal, admit_seconds: float) -> None:
        self.calls.append(("admitted", route, model, held > 0))

    def settled(
        self,
        route: str,
        model: str,
        held: Decimal,
        outcome: SettlementOutcome | None,
        settle_seconds: float,
    ) -> None:
        self.calls.append(("settled", outcome.status if outcome else None, settle_seconds > 0))

    def first_byte(self, route: str, seconds: float) -> None:
        self.calls.append(("first_byte", seconds > 0))

    def finished(self, route: str, seconds: float) -> None:
        self.calls.append(("finished", seconds > 0))


async def test_a_recorder_of_your_own_is_told_each_step_once(
    build: Build, ledger: SQLiteLedger
) -> None:
    recorder = Recorder()
    key, _ = await new_key(ledger)
    app = build(metrics=recorder)
    body = {"model": "test-model", "messages": HELLO, "stream": True}
    exchange = await call(app, CHAT, json_body=body, headers={"authorization": f"Bearer {key}"})
    assert exchange.status == 200
    assert recorder.calls == [
        ("admitted", CHAT, "test-model", True),
        ("first_byte", True),
        ("settled", "success", True),
        ("finished", True),
    ]
    recorder.calls.clear()
    exchange = await call(app, CHAT, body=b"{not json", headers={"authorization": f"Bearer {key}"})
    assert exchange.status == 400
    assert recorder.calls == [("refused", CHAT, "bad_request", False), ("finished", True)]


class Broken(Recorder):
    """A recorder with a bug in every method."""

    def __getattribute__(self, name: str) -> Any:
        if name in ("refused", "admitted", "settled", "first_byte", "finished"):

            def fail(*args: object) -> None:
                raise RuntimeError("bug in the recorder")

            return fail
        return super().__getattribute__(name)


async def test_a_recorder_that_raises_breaks_no_request(
    build: Build, ledger: SQLiteLedger, caplog: pytest.LogCaptureFixture
) -> None:
    key, _ = await new_key(ledger)
    app = build(metrics=Broken())
    body = {"model": "test-model", "messages": HELLO, "stream": True}
    exchange = await call(app, CHAT, json_body=body, headers={"authorization": f"Bearer {key}"})
    assert exchange.status == 200
    assert exchange.complete
    [record] = await ledger.usage()
    assert record.status == "success"
    assert record.cost > 0  # charged; the ledger fixture also checks no hold is left live
    failures = [r for r in caplog.records if "metrics or tracing failed" in r.getMessage()]
    assert len(failures) == 4  # admitted, first_byte, settled, finished


async def test_a_failed_settlement_counts_as_an_error_with_no_usage(kind: Metrics) -> None:
    metrics = kind()
    metrics.admitted(CHAT, "m", Decimal(1), 0.0)
    metrics.settled(CHAT, "m", Decimal(1), None, 0.0)
    samples = await scrape(metrics)
    assert sample(samples, "gatewaykit_requests_total", route=CHAT, model="m", outcome="error") == 1
    assert sample(samples, "gatewaykit_usage_source_total", source="none") == 1
    assert sample(samples, "gatewaykit_holds_live") == 0
    assert type(metrics).__name__ in repr(metrics)


class Stuck:
    async def size(self) -> int:
        raise OSError("disk gone")


async def test_an_outbox_that_fails_at_scrape_time_is_logged_and_the_rest_served(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = PrometheusMetrics()
    broken: Any = Stuck()
    metrics.watch_outbox(broken)
    samples = await scrape(metrics)
    assert sample(samples, "gatewaykit_holds_live") == 0
    assert "refreshing metrics failed: OSError" in caplog.text


def test_histogram_buckets_must_increase() -> None:
    with pytest.raises(ConfigurationError, match="increasing"):
        PrometheusMetrics(request_buckets=[1.0, 0.5])


async def test_a_multiprocess_directory_is_read_instead_of_the_registry(tmp_path: Path) -> None:
    metrics = PrometheusMetrics()
    metrics.finished(CHAT, 0.1)
    app = MetricsApp(metrics, multiprocess_dir=str(tmp_path))
    assert "multiprocess=True" in repr(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ops") as http:
        text = (await http.get("/metrics")).text
    assert "gatewaykit_request_seconds" not in text  # no worker wrote to the directory
