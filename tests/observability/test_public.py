"""gatewaykit.observability's public names are pinned, and each resolves on first use."""

from __future__ import annotations

import pytest

import gatewaykit.observability

EXPECTED = [
    "HealthApp",
    "MetricsApp",
    "MetricsRecorder",
    "MultiprocessPrometheusMetrics",
    "OpenTelemetryTracing",
    "PrometheusMetrics",
]


def test_all_is_pinned() -> None:
    assert sorted(gatewaykit.observability.__all__) == EXPECTED
    assert dir(gatewaykit.observability) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_every_name_resolves(name: str) -> None:
    assert getattr(gatewaykit.observability, name).__name__ == name


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gatewaykit.observability.Nope  # noqa: B018
