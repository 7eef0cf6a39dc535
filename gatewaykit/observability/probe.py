"""The per-request bridge from GatewayMiddleware to the metrics recorder and tracing.

Made only when metrics or tracing are configured, so a gateway without them allocates
nothing for them. It is also the settlement's :class:`~gatewaykit.settlement.RequestObserver`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping
from decimal import Decimal
from typing import TYPE_CHECKING

from gatewaykit.context import GatewayContext
from gatewaykit.errors import ErrorKind
from gatewaykit.observability.recorder import MetricsRecorder, denial_reason
from gatewaykit.settlement import SettlementOutcome
from gatewaykit.upstream import Attempt

if TYPE_CHECKING:
    from gatewaykit.observability.tracing import OpenTelemetryTracing, RequestTrace

__all__ = ["Instruments", "RequestProbe"]

_clock = time.perf_counter


class Instruments:
    """A middleware's metrics recorder and tracing (either may be None, not both)."""

    __slots__ = ("metrics", "tracing")

    def __init__(
        self, metrics: MetricsRecorder | None, tracing: OpenTelemetryTracing | None
    ) -> None:
        self.metrics = metrics
        self.tracing = tracing

    def start(self, route: str, headers: Mapping[str, str]) -> RequestProbe:
        trace = self.tracing.start(route, headers) if self.tracing is not None else None
        return RequestProbe(self.metrics, trace, route)


class RequestProbe:
    """One gated request's observations, in the order the middleware makes them."""

    __slots__ = (
        "admit_started",
        "closed",
        "context",
        "metrics",
        "route",
        "settle_started",
        "started",
        "trace",
    )

    def __init__(
        self, metrics: MetricsRecorder | None, trace: RequestTrace | None, route: str
    ) -> None:
        self.metrics = metrics
        self.trace = trace
        self.route = route
        self.started = _clock()
        self.admit_started: float | None = None
        self.settle_started = 0.0
        self.context: GatewayContext | None = None
        self.closed = False  # the hold was reported closed

    def activate(self) -> None:
        if self.trace is not None:
            self.trace.activate()

    def admitting(self) -> None:
        self.admit_started = _clock()
        if self.trace is not None:
            self.trace.admitting()

    def refused(self, kind: ErrorKind) -> None:
        if self.metrics is not None:
            seconds = None if self.admit_started is None else _clock() - self.admit_started
            self.metrics.refused(self.route, denial_reason(kind), seconds)
        if self.trace is not None:
            self.trace.refused(kind)

    def admitted(self, context: GatewayContext) -> None:
        self.context = context
        context.settlement.observer = self
        if self.metrics is not None:
            assert self.admit_started is not None
            held = context.settlement.estimate.amount
            self.metrics.admitted(self.route, context.model, held, _clock() - self.admit_started)
        if self.trace is not None:
            self.trace.admitted(context)

    def first_byte(self) -> None:
        if self.metrics is not None:
            self.metrics.first_byte(self.route, _clock() - self.started)

    # -- RequestObserver (called by the settlement) ------------------------------------
    def attempt(self, attempt: Attempt) -> None:
        if self.trace is not None:
            self.trace.attempt(attempt)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        if self.trace is not None:
            self.trace.inject(headers)

    def settling(self) -> None:
        self.settle_started = _clock()
        if self.trace is not None:
            self.trace.settling()

    def settled(self, outcome: SettlementOutcome | None) -> None:
        context = self.context
        if context is None or self.closed:
            return
        settlement = context.settlement
        if self.trace is not None:
            self.trace.settled(outcome, settlement.estimate.amount, settlement.response_id)
        if outcome is None:
            return  # a later hook may still settle; finished() closes it otherwise
        self._close(outcome)

    def _close(self, outcome: SettlementOutcome | None) -> None:
        self.closed = True
        if self.metrics is not None and self.context is not None:
            held: Decimal = self.context.settlement.estimate.amount
            seconds = _clock() - self.settle_started if self.settle_started else 0.0
            self.metrics.settled(self.route, self.context.model, held, outcome, seconds)

    def finished(self, status: int) -> None:
        context = self.context
        if context is not None:
            if not self.closed:
                self._close(context.settlement.outcome)
            # Break the cycle probe → context → settlement → probe: freed at once, not
            # left to the garbage collector (whose extra passes cost more than the hooks).
            context.settlement.observer = None
            self.context = None
        if self.metrics is not None:
            self.metrics.finished(self.route, _clock() - self.started)
        if self.trace is not None:
            self.trace.finished(status)
