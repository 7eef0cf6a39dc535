"""Prometheus metrics on prometheus_client (the ``gatewaykit[metrics]`` extra).

:class:`PrometheusMetrics` is a :class:`~gatewaykit.observability.MetricsRecorder`: pass
it to ``GatewayMiddleware(metrics=...)`` and serve :class:`MetricsApp` at ``/metrics``.
Every name and label set is listed in docs/observability.md.

A request adds to a few plain numbers (dict and list slots, an exact ``Decimal`` for
money); prometheus_client renders them only when scraped, through a custom collector.
That keeps the request path within a few per cent of no metrics at all — prometheus_client's
own metric objects take a lock and several calls per increment. The price: the numbers
live in this process. Under several worker processes use
:class:`~gatewaykit.observability.MultiprocessPrometheusMetrics` instead.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from decimal import Decimal

import anyio
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
TOKEN_KINDS = ("input", "output", "cache_read", "cache_write")
OUTCOMES = ("success", "error", "incomplete", "no_usage")
SOURCES = ("provider", "partial", "estimated", "none")

HELP = {
    "requests": "Gated requests by how they ended (refused: denied before any provider call).",
    "denials": "Requests refused, by reason.",
    "cost_usd": "USD charged (the ledger is exact; this is a float).",
    "overrun_usd": "USD charged beyond the request's hold.",
    "tokens": "Tokens charged, by kind.",
    "usage_source": "Settled requests by where their usage came from.",
    "holds_live": "Holds this process has open.",
    "held_usd": "USD held by this process's open holds.",
    "upstream_first_byte_seconds": (
        "Seconds from the request's arrival to the first byte of a successful response."
    ),
    "request_seconds": "Seconds a gated request took, refusals included.",
    "ledger_seconds": "Seconds in admission (admit: key lookup and hold) and the terminal settle.",
}


class MetricsBase:
    """What both Prometheus recorders share: the registry, the bounded ``model`` label,
    and the platform mode's outbox gauges (read at scrape time)."""

    def __init__(self, registry: CollectorRegistry | None, max_models: int) -> None:
        if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1:
            raise ConfigurationError("max_models must be a positive int")
        self.registry = CollectorRegistry() if registry is None else registry
        self.max_models = max_models
        self._models: set[str] = set()
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def _model(self, model: str) -> str:
        """``model``, or ``other`` once ``max_models`` names were seen."""
        if model in self._models:
            return model
        if len(self._models) >= self.max_models:
            return OTHER_MODEL
        self._models.add(model)
        return model

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


class _Histogram:
    """Bucket counts (the last one is +Inf) and the sum, as prometheus_client keeps them."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        counts = list(self.counts)  # a copy: a scrape in another thread sees one state
        cumulative, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            cumulative += count
            out.append((floatToGoString(bound), float(cumulative)))  # type: ignore[no-untyped-call]
        return out


class PrometheusMetrics(MetricsBase):
    """gatewaykit's metrics for one process, rendered into a prometheus_client registry
    (a fresh one unless given) when scraped; see the module docstring.

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
        super().__init__(registry, max_models)
        self._bounds = {
            "request": _bounds(request_buckets),
            "first_byte": _bounds(first_byte_buckets),
        }
        self._requests: dict[tuple[str, str, str], int] = {}
        self._denials: dict[tuple[str, str], int] = {}
        self._cost: dict[str, Decimal] = {}
        self._overrun: dict[str, Decimal] = {}
        self._tokens: dict[str, list[int]] = {}
        self._sources = dict.fromkeys(SOURCES, 0)
        self._holds = 0
        self._held = Decimal(0)  # exact: back to 0 when every hold closed
        self._first_byte: dict[str, _Histogram] = {}
        self._seconds: dict[str, _Histogram] = {}
        ledger = _bounds(ledger_buckets)
        self._admit = _Histogram(ledger)
        self._settle = _Histogram(ledger)
        self.registry.register(_Collector(self))

    def __repr__(self) -> str:
        return f"<PrometheusMetrics models={len(self._models)} holds={self._holds}>"

    # -- MetricsRecorder ---------------------------------------------------------------
    def refused(self, route: str, reason: DenialReason, admit_seconds: float | None) -> None:
        key = (route, "", "refused")
        self._requests[key] = self._requests.get(key, 0) + 1
        self._denials[(route, reason)] = self._denials.get((route, reason), 0) + 1
        if admit_seconds is not None:
            self._admit.observe(admit_seconds)

    def admitted(self, route: str, model: str, held: Decimal, admit_seconds: float) -> None:
        self._admit.observe(admit_seconds)
        self._holds += 1
        self._held += held

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
        model = self._model(model)
        key = (route, model, "error" if outcome is None else outcome.status)
        self._requests[key] = self._requests.get(key, 0) + 1
        usage = None if outcome is None else outcome.usage
        if outcome is not None and outcome.charged:
            charged = outcome.charged
            self._cost[model] = self._cost.get(model, Decimal(0)) + charged
            if charged > held:
                self._overrun[model] = self._overrun.get(model, Decimal(0)) + charged - held
        if usage is None:
            self._sources["none"] += 1
            return
        self._sources[usage.source.value] += 1
        tokens = self._tokens.get(model)
        if tokens is None:
            tokens = self._tokens[model] = [0, 0, 0, 0]
        tokens[0] += usage.input_tokens
        tokens[1] += usage.output_tokens
        tokens[2] += usage.cache_read_tokens
        tokens[3] += usage.cache_write_tokens

    def first_byte(self, route: str, seconds: float) -> None:
        histogram = self._first_byte.get(route)
        if histogram is None:
            histogram = self._first_byte[route] = _Histogram(self._bounds["first_byte"])
        histogram.observe(seconds)

    def finished(self, route: str, seconds: float) -> None:
        histogram = self._seconds.get(route)
        if histogram is None:
            histogram = self._seconds[route] = _Histogram(self._bounds["request"])
        histogram.observe(seconds)

    # -- rendering ---------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        """The metric families as they stand (called by the registry when scraped)."""
        requests = CounterMetricFamily(
            "gatewaykit_requests", HELP["requests"], labels=["route", "model", "outcome"]
        )
        for labels, count in dict(self._requests).items():
            requests.add_metric(labels, count)
        yield requests
        denials = CounterMetricFamily(
            "gatewaykit_denials", HELP["denials"], labels=["route", "reason"]
        )
        for route_reason, count in dict(self._denials).items():
            denials.add_metric(route_reason, count)
        yield denials
        for name, amounts in (("cost_usd", self._cost), ("overrun_usd", self._overrun)):
            money = CounterMetricFamily(f"gatewaykit_{name}", HELP[name], labels=["model"])
            for model, amount in dict(amounts).items():
                money.add_metric([model], float(amount))
            yield money
        tokens = CounterMetricFamily("gatewaykit_tokens", HELP["tokens"], labels=["model", "kind"])
        for model, counts in dict(self._tokens).items():
            for kind, count in zip(TOKEN_KINDS, list(counts), strict=True):
                tokens.add_metric([model, kind], count)
        yield tokens
        sources = CounterMetricFamily(
            "gatewaykit_usage_source", HELP["usage_source"], labels=["source"]
        )
        for source, count in dict(self._sources).items():
            sources.add_metric([source], count)
        yield sources
        yield GaugeMetricFamily("gatewaykit_holds_live", HELP["holds_live"], value=self._holds)
        yield GaugeMetricFamily("gatewaykit_held_usd", HELP["held_usd"], value=float(self._held))
        for name, histograms in (
            ("upstream_first_byte_seconds", self._first_byte),
            ("request_seconds", self._seconds),
        ):
            timing = HistogramMetricFamily(f"gatewaykit_{name}", HELP[name], labels=["route"])
            for route, histogram in dict(histograms).items():
                timing.add_metric([route], histogram.buckets(), histogram.total)
            yield timing
        ledger = HistogramMetricFamily(
            "gatewaykit_ledger_seconds", HELP["ledger_seconds"], labels=["op"]
        )
        for op, histogram in (("admit", self._admit), ("settle", self._settle)):
            ledger.add_metric([op], histogram.buckets(), histogram.total)
        yield ledger


class _Collector(Collector):
    """Registered in the registry; renders a PrometheusMetrics when scraped."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self.metrics.collect()


def _bounds(buckets: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in buckets if b != float("inf"))
    if not bounds or list(bounds) != sorted(set(bounds)):
        raise ConfigurationError("histogram buckets must be increasing numbers")
    return bounds


class MetricsApp:
    """An ASGI app serving the metrics in Prometheus' text format (or OpenMetrics when
    the scraper asks for it). Mount it at ``/metrics``.

    ``multiprocess_dir``: serve every worker's metrics from prometheus_client's
    multiprocess directory (the one in ``PROMETHEUS_MULTIPROC_DIR``) instead of this
    process's registry (with :class:`~gatewaykit.observability.MultiprocessPrometheusMetrics`).
    """

    def __init__(self, metrics: MetricsBase, *, multiprocess_dir: str | None = None) -> None:
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
