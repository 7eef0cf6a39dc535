"""gatewaykit: turn a Starlette or FastAPI app into a budget-enforcing LLM gateway."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
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

# Imported on first use: keeps `import gatewaykit` cheap and asyncpg optional.
_LAZY = {
    "BudgetExceeded": "gatewaykit.errors",
    "GatewayKitError": "gatewaykit.errors",
    "GatewayMiddleware": "gatewaykit.middleware",
    "ModelPrice": "gatewaykit.pricing",
    "PlatformMode": "gatewaykit.modes.platform",
    "PostgresLedger": "gatewaykit.ledger.postgres",
    "PriceTable": "gatewaykit.pricing",
    "RequestModeStrategy": "gatewaykit.modes.base",
    "SQLiteLedger": "gatewaykit.ledger.sqlite",
    "Settlement": "gatewaykit.settlement",
    "StandaloneMode": "gatewaykit.modes.standalone",
    "Upstream": "gatewaykit.upstream",
    "Usage": "gatewaykit.usage",
    "get_settlement": "gatewaykit.settlement",
    "open_ledger": "gatewaykit.ledger",
    "settle_stream": "gatewaykit.streams",
}

if TYPE_CHECKING:
    from gatewaykit.errors import BudgetExceeded, GatewayKitError
    from gatewaykit.ledger import open_ledger
    from gatewaykit.ledger.postgres import PostgresLedger
    from gatewaykit.ledger.sqlite import SQLiteLedger
    from gatewaykit.middleware import GatewayMiddleware
    from gatewaykit.modes.base import RequestModeStrategy
    from gatewaykit.modes.platform import PlatformMode
    from gatewaykit.modes.standalone import StandaloneMode
    from gatewaykit.pricing import ModelPrice, PriceTable
    from gatewaykit.settlement import Settlement, get_settlement
    from gatewaykit.streams import settle_stream
    from gatewaykit.upstream import Upstream
    from gatewaykit.usage import Usage


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gatewaykit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
