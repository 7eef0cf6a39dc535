"""The per-request bridge from GatewayMiddleware to the metrics recorder and tracing.

Made only when metrics or tracing are configured, so a gateway without them allocates
nothing for them. It is also the settlement's :class:`~gatewaykit.settlement.RequestObserver`.
A recorder or tracer that raises is logged and otherwise ignored: observing a request
must never break it, least of all its settlement.
"""

from __future__ import annotations

import logging
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

logger = logging.getLogger("gatewaykit.observability")

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
        try:
            if self.trace is not None:
                self.trace.activate()
        except Exception:
            _failed()

    def admitting(self) -> None:
        self.admit_started = _clock()
        try:
            if self.trace is not None:
                self.trace.admitting()
        except Exception:
            _failed()

    def refused(self, kind: ErrorKind) -> None:
        try:
            if self.metrics is not None:
                seconds = None if self.admit_started is None else _clock() - self.admit_started
                self.metrics.refused(self.route, denial_reason(kind), seconds)
            if self.trace is not None:
                self.trace.refused(kind)
        except Exception:
            _failed()

    def admitted(self, context: GatewayContext) -> None:
        self.context = context
        context.settlement.observer = self
        try:
            if self.metrics is not None:
                started = self.admit_started or self.started
                held = context.settlement.estimate.amount
                self.metrics.admitted(self.route, context.model, held, _clock() - started)
            if self.trace is not None:
                self.trace.admitted(context)
        except Exception:
            _failed()

    def first_byte(self) -> None:
        try:
            if self.metrics is not None:
                self.metrics.first_byte(self.route, _clock() - self.started)
        except Exception:
            _failed()

    # -- RequestObserver (called by the settlement) ------------------------------------
    def attempt(self, attempt: Attempt) -> None:
        try:
            if self.trace is not None:
                self.trace.attempt(attempt)
        except Exception:
            _failed()

    def inject(self, headers: MutableMapping[str, str]) -> None:
        try:
            if self.trace is not None:
                self.trace.inject(headers)
        except Exception:
            _failed()

    def settling(self) -> None:
        self.settle_started = _clock()
        try:
            if self.trace is not None:
                self.trace.settling()
        except Exception:
            _failed()

    def settled(self, outcome: SettlementOutcome | None) -> None:
        context = self.context
        if context is None or self.closed:
            return
        settlement = context.settlement
        try:
            if self.trace is not None:
                self.trace.settled(outcome, settlement.estimate.amount, settlement.response_id)
        except Exception:
            _failed()
        if outcome is not None:  # else a later hook may still settle; finished() closes
            self._close(outcome)

    def _close(self, outcome: SettlementOutcome | None) -> None:
        self.closed = True
        try:
            if self.metrics is not None and self.context is not None:
                held: Decimal = self.context.settlement.estimate.amount
                seconds = _clock() - self.settle_started if self.settle_started else 0.0
                self.metrics.settled(self.route, self.context.model, held, outcome, seconds)
        except Exception:
            _failed()

    def finished(self, status: int) -> None:
        context = self.context
        if context is not None:
            if not self.closed:
                self._close(context.settlement.outcome)
            # Break the cycle probe → context → settlement → probe: freed at once, not
            # left to the garbage collector (whose extra passes cost more than the hooks).
            context.settlement.observer = None
            self.context = None
        try:
            if self.metrics is not None:
                self.metrics.finished(self.route, _clock() - self.started)
            if self.trace is not None:
                self.trace.finished(status)
        except Exception:
            _failed()


def _failed() -> None:
    """A recorder or tracer raised: logged, and the request goes on (money never waits)."""
    logger.exception("gatewaykit metrics or tracing failed; the request is unaffected")
