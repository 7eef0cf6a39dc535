"""Operating a gateway: Prometheus metrics, OpenTelemetry traces, health checks.

``MetricsRecorder`` (the Protocol GatewayMiddleware reports to) and ``HealthApp``
(``/livez``, ``/readyz``) need nothing extra. ``PrometheusMetrics``,
``MultiprocessPrometheusMetrics`` and ``MetricsApp`` need prometheus_client
(``pip install 'gatewaykit[metrics]'``), ``OpenTelemetryTracing`` the OpenTelemetry API
(``gatewaykit[otel]``); each is imported on first use, so neither library is imported
unless asked for. See docs/observability.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "HealthApp",
    "MetricsApp",
    "MetricsRecorder",
    "MultiprocessPrometheusMetrics",
    "OpenTelemetryTracing",
    "PrometheusMetrics",
]

_LAZY = {
    "HealthApp": "gatewaykit.observability.health",
    "MetricsApp": "gatewaykit.observability.prometheus",
    "MetricsRecorder": "gatewaykit.observability.recorder",
    "MultiprocessPrometheusMetrics": "gatewaykit.observability.multiprocess",
    "OpenTelemetryTracing": "gatewaykit.observability.tracing",
    "PrometheusMetrics": "gatewaykit.observability.prometheus",
}

if TYPE_CHECKING:
    from gatewaykit.observability.health import HealthApp
    from gatewaykit.observability.multiprocess import MultiprocessPrometheusMetrics
    from gatewaykit.observability.prometheus import MetricsApp, PrometheusMetrics
    from gatewaykit.observability.recorder import MetricsRecorder
    from gatewaykit.observability.tracing import OpenTelemetryTracing


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gatewaykit.observability' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
