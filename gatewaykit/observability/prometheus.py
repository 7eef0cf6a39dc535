"""Prometheus metrics on prometheus_client (the ``gatewaykit[metrics]`` extra).

:class:`PrometheusMetrics` is a :class:`~gatewaykit.observability.MetricsRecorder`: pass
it to ``GatewayMiddleware(metrics=...)`` and serve :class:`MetricsApp` at ``/metrics``.
Every name and label set is listed in docs/observability.md. Labelled series are looked
up once and kept, so a request costs a few counter increments and histogram observations.
Under several worker processes, prometheus_client's multiprocess mode applies (set
``PROMETHEUS_MULTIPROC_DIR`` before the workers start and give :class:`MetricsApp` the
same directory); the gauges are declared with the right multiprocess aggregation.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any

import anyio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from gatewaykit.errors import ConfigurationError
from gatewaykit.observability.asgi import Receive, Scope, Send, serve_get
from gatewaykit.observability.recorder import DenialReason
from gatewaykit.outbox.base import Outbox
from gatewaykit.settlement import SettlementOutcome

__all__ = ["MetricsApp", "PrometheusMetrics"]

logger = logging.getLogger("gatewaykit.metrics")

#: Whole requests: from a few milliseconds to long streams.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Time to the first byte: dominated by the provider's time to first token.
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
#: Ledger operations: sub-millisecond commits to a struggling database.
LEDGER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
#: The ``model`` label of models beyond ``max_models`` (model names are client input).
OTHER_MODEL = "other"
_TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")


class _ModelSeries:
    """The labelled children of one (route, model): looked up once, then reused."""

    __slots__ = ("cost", "outcomes", "overrun", "tokens")

    def __init__(self, metrics: PrometheusMetrics, route: str, model: str) -> None:
        self.outcomes = {
            outcome: metrics.requests.labels(route, model, outcome)
            for outcome in ("success", "error", "incomplete", "no_usage")
        }
        self.cost = metrics.cost.labels(model)
        self.overrun = metrics.overrun.labels(model)
        self.tokens = tuple(metrics.tokens.labels(model, kind) for kind in _TOKEN_KINDS)


class _RouteSeries:
    __slots__ = ("denials", "first_byte", "refused", "seconds")

    def __init__(self, metrics: PrometheusMetrics, route: str) -> None:
        self.refused = metrics.requests.labels(route, "", "refused")
        self.denials: dict[str, Any] = {}
        self.first_byte = metrics.first_byte_seconds.labels(route)
        self.seconds = metrics.request_seconds.labels(route)


class PrometheusMetrics:
    """gatewaykit's metrics in a prometheus_client registry (a fresh one unless given).

    ``max_models`` bounds the ``model`` label: further model names are counted as
    ``"other"`` (under ``unpriced="allow"`` a client could otherwise invent series).
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
        if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1:
            raise ConfigurationError("max_models must be a positive int")
        self.registry = CollectorRegistry() if registry is None else registry
        self.max_models = max_models
        r = self.registry
        self.requests = Counter(
            "gatewaykit_requests",
            "Gated requests by how they ended (refused: denied before any provider call).",
            ["route", "model", "outcome"],
            registry=r,
        )
        self.denials = Counter(
            "gatewaykit_denials", "Requests refused, by reason.", ["route", "reason"], registry=r
        )
        self.cost = Counter(
            "gatewaykit_cost_usd", "USD charged (the ledger is exact; this is a float).",
            ["model"], registry=r,
        )  # fmt: skip
        self.overrun = Counter(
            "gatewaykit_overrun_usd", "USD charged beyond the request's hold.", ["model"],
            registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "gatewaykit_tokens", "Tokens charged, by kind.", ["model", "kind"], registry=r
        )
        self.usage_source = Counter(
            "gatewaykit_usage_source",
            "Settled requests by where their usage came from.",
            ["source"],
            registry=r,
        )
        self.holds_live = Gauge(
            "gatewaykit_holds_live", "Holds this process has open.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.held_usd = Gauge(
            "gatewaykit_held_usd", "USD held by this process's open holds.", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.first_byte_seconds = Histogram(
            "gatewaykit_upstream_first_byte_seconds",
            "Seconds from the request's arrival to the first byte of a successful response.",
            ["route"],
            buckets=first_byte_buckets,
            registry=r,
        )
        self.request_seconds = Histogram(
            "gatewaykit_request_seconds", "Seconds a gated request took, refusals included.",
            ["route"], buckets=request_buckets, registry=r,
        )  # fmt: skip
        self.ledger_seconds = Histogram(
            "gatewaykit_ledger_seconds",
            "Seconds in admission (admit: key lookup and hold) and in the terminal settle.",
            ["op"],
            buckets=ledger_buckets,
            registry=r,
        )
        self._admit = self.ledger_seconds.labels("admit")
        self._settle = self.ledger_seconds.labels("settle")
        self._sources = {
            source: self.usage_source.labels(source)
            for source in ("provider", "partial", "estimated", "none")
        }
        self._routes: dict[str, _RouteSeries] = {}
        self._series: dict[tuple[str, str], _ModelSeries] = {}
        self._models: set[str] = set()
        self._holds = 0
        self._held = Decimal(0)  # exact: back to 0 when every hold closed
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def __repr__(self) -> str:
        return f"<PrometheusMetrics models={len(self._models)} holds={self._holds}>"

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
        series = self._model(route, model)
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

    # -- platform mode -----------------------------------------------------------------
    def watch_outbox(self, outbox: Outbox, *, timeout: float = 1.0) -> None:
        """Report the usage outbox (platform mode) at every scrape.

        ``gatewaykit_outbox_pending``, ``gatewaykit_outbox_oldest_seconds`` and
        ``gatewaykit_outbox_dead_letters`` are read from ``outbox`` when
        :class:`MetricsApp` is scraped (within ``timeout`` seconds, else left as they were).
        """
        r = self.registry
        pending = Gauge(
            "gatewaykit_outbox_pending", "Usage reports not yet acknowledged.",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        oldest = Gauge(
            "gatewaykit_outbox_oldest_seconds", "Age of the oldest unacknowledged report.",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip
        dead = Gauge(
            "gatewaykit_outbox_dead_letters", "Usage reports parked after permanent failure.",
            registry=r, multiprocess_mode="mostrecent",
        )  # fmt: skip

        async def refresh() -> None:
            with anyio.move_on_after(timeout):
                pending.set(await outbox.size())
                oldest.set(await outbox.oldest_age() or 0.0)
                dead.set(await outbox.dead_count())

        self._refreshers.append(refresh)

    async def refresh(self) -> None:
        """Read what is polled rather than counted (the outbox); failures are logged."""
        for refresh in self._refreshers:
            try:
                await refresh()
            except Exception as exc:
                logger.warning("refreshing metrics failed: %s", type(exc).__name__)

    # -- series ------------------------------------------------------------------------
    def _route(self, route: str) -> _RouteSeries:
        series = self._routes.get(route)
        if series is None:
            series = self._routes[route] = _RouteSeries(self, route)
        return series

    def _model(self, route: str, model: str) -> _ModelSeries:
        series = self._series.get((route, model))
        if series is None:
            if model not in self._models:
                if len(self._models) >= self.max_models:
                    model = OTHER_MODEL  # not remembered: the series set stays bounded
                    series = self._series.get((route, model))
                    if series is not None:
                        return series
                else:
                    self._models.add(model)
            series = self._series[(route, model)] = _ModelSeries(self, route, model)
        return series


class MetricsApp:
    """An ASGI app serving the metrics in Prometheus' text format (or OpenMetrics when
    the scraper asks for it). Mount it at ``/metrics``.

    ``multiprocess_dir``: serve every worker's metrics from prometheus_client's
    multiprocess directory (the one in ``PROMETHEUS_MULTIPROC_DIR``) instead of this
    process's registry.
    """

    def __init__(self, metrics: PrometheusMetrics, *, multiprocess_dir: str | None = None) -> None:
        self.metrics = metrics
        self.multiprocess_dir = multiprocess_dir

    def __repr__(self) -> str:
        return f"<MetricsApp multiprocess={self.multiprocess_dir is not None}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_get(scope, receive, send, self._respond)

    async def _respond(self, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        await self.metrics.refresh()
        registry = self.metrics.registry
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return 200, content_type, encoder(registry)
