"""Prometheus metrics for several worker processes (prometheus_client's multiprocess mode).

:class:`MultiprocessPrometheusMetrics` records into prometheus_client's own metric
objects, which write to memory-mapped files when ``PROMETHEUS_MULTIPROC_DIR`` is set
before the workers start; one :class:`~gatewaykit.observability.MetricsApp` given the
same directory serves the sum. The gauges are declared with the aggregation that fits
(``livesum`` for holds). It costs more per request than
:class:`~gatewaykit.observability.PrometheusMetrics` (a lock and several calls per
increment): docs/observability.md has the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gatewaykit.observability.prometheus import (
    FIRST_BYTE_BUCKETS,
    HELP,
    LEDGER_BUCKETS,
    OUTCOMES,
    REQUEST_BUCKETS,
    SOURCES,
    TOKEN_KINDS,
    MetricsBase,
)
from gatewaykit.observability.recorder import DenialReason
from gatewaykit.settlement import SettlementOutcome

__all__ = ["MultiprocessPrometheusMetrics"]


class _ModelSeries:
    """The labelled children of one (route, model): looked up once, then reused."""

    __slots__ = ("cost", "outcomes", "overrun", "tokens")

    def __init__(self, metrics: MultiprocessPrometheusMetrics, route: str, model: str) -> None:
        self.outcomes = {
            outcome: metrics.requests.labels(route, model, outcome) for outcome in OUTCOMES
        }
        self.cost = metrics.cost.labels(model)
        self.overrun = metrics.overrun.labels(model)
        self.tokens = tuple(metrics.tokens.labels(model, kind) for kind in TOKEN_KINDS)


class _RouteSeries:
    __slots__ = ("denials", "first_byte", "refused", "seconds")

    def __init__(self, metrics: MultiprocessPrometheusMetrics, route: str) -> None:
        self.refused = metrics.requests.labels(route, "", "refused")
        self.denials: dict[str, Any] = {}
        self.first_byte = metrics.first_byte_seconds.labels(route)
        self.seconds = metrics.request_seconds.labels(route)


class MultiprocessPrometheusMetrics(MetricsBase):
    """gatewaykit's metrics as prometheus_client's own metric objects, which its
    multiprocess mode aggregates across worker processes; see the module docstring.

    ``max_models`` bounds the ``model`` label as in
    :class:`~gatewaykit.observability.PrometheusMetrics`.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_models: int = 200,
        request_buckets: Sequence[float] = REQUEST_BUCKETS,
        first_byte_buckets: Sequence[float] = FIRST_BYTE_BUCKETS,
        ledger_buckets: Sequence[float] = LEDGER_BUCKETS,
    ) -> None:
        super().__init__(registry, max_models)
        r = self.registry
        self.requests = Counter(
            "gatewaykit_requests", HELP["requests"], ["route", "model", "outcome"], registry=r
        )
        self.denials = Counter(
            "gatewaykit_denials", HELP["denials"], ["route", "reason"], registry=r
        )
        self.cost = Counter("gatewaykit_cost_usd", HELP["cost_usd"], ["model"], registry=r)
        self.overrun = Counter("gatewaykit_overrun_usd", HELP["overrun_usd"], ["model"], registry=r)
        self.tokens = Counter("gatewaykit_tokens", HELP["tokens"], ["model", "kind"], registry=r)
        self.usage_source = Counter(
            "gatewaykit_usage_source", HELP["usage_source"], ["source"], registry=r
        )
        self.holds_live = Gauge(
            "gatewaykit_holds_live", HELP["holds_live"], registry=r, multiprocess_mode="livesum"
        )
        self.held_usd = Gauge(
            "gatewaykit_held_usd", HELP["held_usd"], registry=r, multiprocess_mode="livesum"
        )
        self.first_byte_seconds = Histogram(
            "gatewaykit_upstream_first_byte_seconds", HELP["upstream_first_byte_seconds"],
            ["route"], buckets=first_byte_buckets, registry=r,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "gatewaykit_request_seconds", HELP["request_seconds"], ["route"],
            buckets=request_buckets, registry=r,
        )  # fmt: skip
        self.ledger_seconds = Histogram(
            "gatewaykit_ledger_seconds", HELP["ledger_seconds"], ["op"],
            buckets=ledger_buckets, registry=r,
        )  # fmt: skip
        self._admit = self.ledger_seconds.labels("admit")
        self._settle = self.ledger_seconds.labels("settle")
        self._sources = {source: self.usage_source.labels(source) for source in SOURCES}
        self._routes: dict[str, _RouteSeries] = {}
        self._series: dict[tuple[str, str], _ModelSeries] = {}
        self._holds = 0
        self._held = Decimal(0)  # exact: back to 0 when every hold closed

    def __repr__(self) -> str:
        return f"<MultiprocessPrometheusMetrics models={len(self._models)} holds={self._holds}>"

    # -- MetricsRecorder ---------------------------------------------------------------
    def refused(self, route: str, reason: DenialReason, admit_seconds: float | None) -> None:
        series = self._route(route)
        series.refused.inc()
        denial = series.denials.get(reason)
        if denial is None:
            denial = series.denials[reason] = self.denials.labels(route, reason)
        denial.inc()
        if admit_seconds is not None:
            self._admit.observe(admit_seconds)

    def admitted(self, route: str, model: str, held: Decimal, admit_seconds: float) -> None:
        self._admit.observe(admit_seconds)
        self._holds += 1
        self._held += held
        self.holds_live.set(self._holds)
        self.held_usd.set(float(self._held))

    def settled(
        self,
        route: str,
        model: str,
        held: Decimal,
        outcome: SettlementOutcome | None,
        settle_seconds: float,
    ) -> None:
        self._settle.observe(settle_seconds)
        self._holds -= 1
        self._held -= held
        self.holds_live.set(self._holds)
        self.held_usd.set(float(self._held))
        series = self._series_of(route, model)
        if outcome is None:
            series.outcomes["error"].inc()
            self._sources["none"].inc()
            return
        series.outcomes[outcome.status].inc()
        charged = outcome.charged
        if charged:
            series.cost.inc(float(charged))
            if charged > held:
                series.overrun.inc(float(charged - held))
        usage = outcome.usage
        if usage is None:
            self._sources["none"].inc()
            return
        self._sources[usage.source.value].inc()
        counts = (
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
        )
        for child, count in zip(series.tokens, counts, strict=True):
            if count:
                child.inc(count)

    def first_byte(self, route: str, seconds: float) -> None:
        self._route(route).first_byte.observe(seconds)

    def finished(self, route: str, seconds: float) -> None:
        self._route(route).seconds.observe(seconds)

    # -- series ------------------------------------------------------------------------
    def _route(self, route: str) -> _RouteSeries:
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = _RouteSeries(self, route)
        return series

    def _series_of(self, route: str, model: str) -> _ModelSeries:
        model = self._model(model)
        series = self._series.get((route, model))
        if series is None:
            series = self._series[(route, model)] = _ModelSeries(self, route, model)
        return series
