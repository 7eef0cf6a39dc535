"""The public surface (docs/api.md) is pinned: adding or removing a name is a decision."""

from __future__ import annotations

import importlib

import pytest

import gatewaykit

EXPECTED = [
    "BudgetExceeded",
    "GatewayKitError",
    "GatewayMiddleware",
    "ModelPrice",
    "PlatformMode",
    "PostgresLedger",
    "PriceTable",
    "RequestModeStrategy",
    "SQLiteLedger",
    "Settlement",
    "StandaloneMode",
    "Upstream",
    "Usage",
    "__version__",
    "get_settlement",
    "open_ledger",
    "settle_stream",
]


def test_all_is_pinned() -> None:
    assert sorted(gatewaykit.__all__) == EXPECTED
    assert sorted(dir(gatewaykit)) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_every_public_name_resolves(name: str) -> None:
    value = getattr(gatewaykit, name)
    assert value is not None
    if name != "__version__":
        assert getattr(value, "__name__", name) == name


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gatewaykit.Nope  # noqa: B018


@pytest.mark.parametrize(
    "module",
    [
        "gatewaykit.adapters",
        "gatewaykit.adapters.openapi",
        "gatewaykit.admin",
        "gatewaykit.config",
        "gatewaykit.ledger",
        "gatewaykit.middleware",
        "gatewaykit.modes.authentication",
        "gatewaykit.modes.fitting",
        "gatewaykit.modes.holds",
        "gatewaykit.modes.platform",
        "gatewaykit.modes.platform_messages",
        "gatewaykit.modes.platform_resolve",
        "gatewaykit.modes.platform_reports",
        "gatewaykit.modes.platform_settlement",
        "gatewaykit.modes.routing",
        "gatewaykit.modes.standalone",
        "gatewaykit.modes.standalone_settlement",
        "gatewaykit.parsing",
        "gatewaykit.ratelimit",
        "gatewaykit.ratelimit.selection",
        "gatewaykit.runtime",
        "gatewaykit.server",
        "gatewaykit.streams",
        "gatewaykit.testing.settlement",
    ],
)
def test_modules_declare_all(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names missing {name}"


def test_the_admin_package_exports_only_its_factory() -> None:
    admin = importlib.import_module("gatewaykit.admin")
    assert admin.__all__ == ["admin_app"]
