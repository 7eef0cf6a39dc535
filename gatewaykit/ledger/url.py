"""``open_ledger(url)``: pick a backend from a URL."""

from __future__ import annotations

from typing import Any, cast

from gatewaykit.errors import InvalidLedgerURLError
from gatewaykit.ledger.base import Ledger
from gatewaykit.urls import open_store

__all__ = ["open_ledger"]


def open_ledger(url: str, **options: Any) -> Ledger:
    """A ledger for ``url``, not yet connected: enter it with ``async with`` or ``await .open()``.

    ``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` also works),
    ``sqlite://:memory:``, ``postgresql://user@host/db`` (needs ``gatewaykit[postgres]``).
    ``options`` go to the backend's constructor.
    """
    ledger = open_store(
        url,
        options,
        what="ledger",
        error=InvalidLedgerURLError,
        sqlite="gatewaykit.ledger.sqlite:SQLiteLedger",
        postgresql="gatewaykit.ledger.postgres:PostgresLedger",
    )
    return cast(Ledger, ledger)
