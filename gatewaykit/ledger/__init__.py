"""Budget ledgers: the protocol, its value types, and ``open_ledger(url)``."""

from __future__ import annotations

from gatewaykit.ledger.base import (
    ApiKeyRecord,
    BudgetStatus,
    DenialCount,
    DenialStore,
    Hold,
    HoldState,
    Ledger,
    OutputFit,
    Period,
    ResponseContext,
    UsageRecord,
    UsageTotal,
)
from gatewaykit.ledger.url import open_ledger

__all__ = [
    "ApiKeyRecord",
    "BudgetStatus",
    "DenialCount",
    "DenialStore",
    "Hold",
    "HoldState",
    "Ledger",
    "OutputFit",
    "Period",
    "ResponseContext",
    "UsageRecord",
    "UsageTotal",
    "open_ledger",
]
