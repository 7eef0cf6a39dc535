"""OpenTelemetry traces of gated requests (the ``gatewaykit[otel]`` extra: API only).

Pass :class:`OpenTelemetryTracing` to ``GatewayMiddleware(tracing=...)``. Each gated
request gets a span ``gatewaykit.request`` (continuing the client's ``traceparent``, or
the current span of an outer instrumentation) with children ``gatewaykit.admission``,
one ``{operation} {model}`` client span per upstream attempt (its context is sent
upstream in ``traceparent``) and ``gatewaykit.settlement``. Attributes follow the
OpenTelemetry GenAI semantic conventions plus ``gatewaykit.*`` for money; no prompt or
completion text and no credential is ever recorded. Without this module imported,
gatewaykit never imports OpenTelemetry.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from contextvars import Token
from decimal import Decimal
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ErrorKind
from gatewaykit.observability.recorder import denial_reason
from gatewaykit.settlement import SettlementOutcome
from gatewaykit.upstream import Attempt

if TYPE_CHECKING:
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["OpenTelemetryTracing", "RequestTrace"]

_OPERATIONS = {
    WireFormat.OPENAI_CHAT: "chat",
    WireFormat.ANTHROPIC_MESSAGES: "chat",
    WireFormat.OPENAI_RESPONSES: "chat",
    WireFormat.OPENAI_EMBEDDINGS: "embeddings",
    WireFormat.ANTHROPIC_COUNT_TOKENS: "count_tokens",  # not a GenAI operation: unmetered
}
_PROVIDERS = {"openai": "openai", "anthropic": "anthropic"}


class OpenTelemetryTracing:
    """Makes a :class:`RequestTrace` per gated request.

    ``tracer_provider`` and ``propagator`` default to OpenTelemetry's global ones (set by
    the SDK or the ``opentelemetry-instrument`` agent); with the API alone, spans are
    no-ops.
    """

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        from gatewaykit import __version__

        self.tracer = trace.get_tracer("gatewaykit", __version__, tracer_provider=tracer_provider)
        self.propagator = propagator if propagator is not None else propagate.get_global_textmap()

    def __repr__(self) -> str:
        return f"<OpenTelemetryTracing propagator={type(self.propagator).__name__}>"

    def start(self, route: str, headers: Mapping[str, str]) -> RequestTrace:
        return RequestTrace(self, route, headers)


class RequestTrace:
    """The spans of one gated request (driven by GatewayMiddleware and the settlement)."""

    __slots__ = (
        "_admission",
        "_attempt",
        "_attempt_model",
        "_operation",
        "_settlement",
        "_settling_ns",
        "_token",
        "context",
        "propagator",
        "span",
        "tracer",
    )

    def __init__(
        self, tracing: OpenTelemetryTracing, route: str, headers: Mapping[str, str]
    ) -> None:
        self.tracer = tracing.tracer
        self.propagator = tracing.propagator
        current = trace.get_current_span()
        if current.get_span_context().is_valid:
            parent, kind = None, SpanKind.INTERNAL  # inside an outer server span
        else:
            parent, kind = self.propagator.extract(headers), SpanKind.SERVER
        self.span: Span = self.tracer.start_span(
            "gatewaykit.request",
            context=parent,
            kind=kind,
            attributes={"http.request.method": "POST", "http.route": route},
        )
        self.context = trace.set_span_in_context(self.span, parent)
        self._token: Token[otel_context.Context] | None = None
        self._operation = "chat"
        self._admission: Span | None = None
        self._attempt: Span | None = None
        self._attempt_model: str | None = None
        self._settlement: Span | None = None
        self._settling_ns: int | None = None

    def activate(self) -> None:
        """Make the request span current (handlers' own spans nest under it)."""
        self._token = otel_context.attach(self.context)

    def admitting(self) -> None:
        self._admission = self.tracer.start_span("gatewaykit.admission", context=self.context)

    def refused(self, kind: ErrorKind) -> None:
        reason = denial_reason(kind)
        self.span.set_attributes(
            {"gatewaykit.outcome": "refused", "gatewaykit.denial_reason": reason}
        )
        if self._admission is not None:
            self._admission.set_attribute("gatewaykit.denial_reason", reason)
            self._admission.end()
            self._admission = None
        if kind.status >= 500:
            self.span.set_status(Status(StatusCode.ERROR, reason))
        self.span.set_attribute("error.type", str(kind.status))

    def admitted(self, context: GatewayContext) -> None:
        operation = _OPERATIONS.get(context.format, "chat") if context.format else "chat"
        self._operation = operation
        held = context.settlement.estimate.amount
        self.span.set_attributes(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": context.model,
                "gatewaykit.request_id": context.request_id,
                "gatewaykit.hold_usd": float(held),
                "gatewaykit.stream": context.stream,
            }
        )
        if self._admission is not None:
            self._admission.set_attribute("gatewaykit.hold_usd", float(held))
            self._admission.end()
            self._admission = None

    def attempt(self, attempt: Attempt) -> None:
        if self._attempt is not None:  # the previous attempt failed before any output
            self._attempt.set_status(Status(StatusCode.ERROR, "attempt failed"))
            self._attempt.set_attribute("error.type", "attempt_failed")
            self._attempt.end()
        upstream = attempt.upstream
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": self._operation,
            "gen_ai.request.model": attempt.model,
            "gen_ai.provider.name": _PROVIDERS.get(upstream.provider, upstream.provider),
            "gatewaykit.attempt_id": attempt.attempt_id,
        }
        url = urlsplit(upstream.base_url)  # host and port only: never userinfo or query
        if url.hostname:
            attributes["server.address"] = url.hostname
            attributes["server.port"] = url.port or (443 if url.scheme == "https" else 80)
        self._attempt = self.tracer.start_span(
            f"{self._operation} {attempt.model}",
            context=self.context,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        self._attempt_model = attempt.model

    def inject(self, headers: MutableMapping[str, str]) -> None:
        span = self._attempt if self._attempt is not None else self.span
        self.propagator.inject(headers, context=trace.set_span_in_context(span))

    def settling(self) -> None:
        self._settling_ns = time.time_ns()
        self._settlement = self.tracer.start_span("gatewaykit.settlement", context=self.context)

    def settled(
        self, outcome: SettlementOutcome | None, held: Decimal, response_id: str | None
    ) -> None:
        settlement, self._settlement = self._settlement, None
        if outcome is None:
            if settlement is not None:
                settlement.set_status(Status(StatusCode.ERROR, "settlement failed"))
                settlement.end()
            return
        money: dict[str, str | float | int] = {
            "gatewaykit.outcome": outcome.status,
            "gatewaykit.cost_usd": float(outcome.charged),
            "gatewaykit.hold_usd": float(held),
            "gatewaykit.usage_source": outcome.usage.source.value if outcome.usage else "none",
        }
        if outcome.charged > held:
            money["gatewaykit.overrun_usd"] = float(outcome.charged - held)
        genai: dict[str, str | int] = {}
        if outcome.usage is not None:
            usage = outcome.usage
            genai["gen_ai.usage.input_tokens"] = usage.input_tokens
            genai["gen_ai.usage.output_tokens"] = usage.output_tokens
            if usage.cache_read_tokens:
                genai["gen_ai.usage.cache_read.input_tokens"] = usage.cache_read_tokens
            if usage.cache_write_tokens:
                genai["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
        if self._attempt_model is not None:
            genai["gen_ai.response.model"] = self._attempt_model
        if response_id:
            genai["gen_ai.response.id"] = response_id
        self.span.set_attributes({**money, **genai})
        attempt, self._attempt = self._attempt, None
        if attempt is not None:  # the attempt that served: ended when settling began
            attempt.set_attributes(genai)
            if outcome.status == "error":
                attempt.set_status(Status(StatusCode.ERROR, "upstream call failed"))
                attempt.set_attribute("error.type", "upstream_error")
            attempt.end(end_time=self._settling_ns)
        if settlement is not None:
            settlement.set_attributes(money)
            if not outcome.recorded:
                settlement.set_status(Status(StatusCode.ERROR, "settlement not recorded"))
            settlement.end()
        if outcome.status == "error":
            self.span.set_status(Status(StatusCode.ERROR, "request failed"))
            self.span.set_attribute("error.type", "request_failed")

    def finished(self, status: int) -> None:
        for span in (self._admission, self._attempt, self._settlement):
            if span is not None:  # left open by an interrupted request
                span.end()
        self._admission = self._attempt = self._settlement = None
        if status:
            self.span.set_attribute("http.response.status_code", status)
            if status >= 500:
                self.span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        self.span.end()
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None
