"""``open_ledger(url)``: pick a backend from a URL."""

from __future__ import annotations

from typing import Any

from gatewaykit.errors import InvalidLedgerURLError
from gatewaykit.ledger.base import Ledger
from gatewaykit.urls import store_target

__all__ = ["open_ledger"]


def open_ledger(url: str, **options: Any) -> Ledger:
    """A ledger for ``url``, not yet connected: enter it with ``async with`` or ``await .open()``.

    ``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` also works),
    ``sqlite://:memory:``, ``postgresql://user@host/db`` (needs ``gatewaykit[postgres]``).
    ``options`` go to the backend's constructor.
    """
    kind, target = store_target(url, what="ledger", error=InvalidLedgerURLError)
    if kind == "sqlite":
        from gatewaykit.ledger.sqlite import SQLiteLedger

        return SQLiteLedger(target, **options)
    try:
        from gatewaykit.ledger.postgres import PostgresLedger
    except ImportError as exc:  # asyncpg missing
        raise InvalidLedgerURLError(
            f"PostgreSQL ledgers need the extra: pip install 'gatewaykit[postgres]' ({exc})"
        ) from None
    return PostgresLedger(target, **options)
