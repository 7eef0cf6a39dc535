"""``open_ledger(url)``: pick a backend from a URL."""

from __future__ import annotations

from typing import Any

from gatewaykit.errors import InvalidLedgerURLError
from gatewaykit.ledger.base import Ledger

__all__ = ["open_ledger"]


def open_ledger(url: str, **options: Any) -> Ledger:
    """A ledger for ``url``, not yet connected: enter it with ``async with`` or ``await .open()``.

    ``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` also works),
    ``sqlite://:memory:``, ``postgresql://user@host/db`` (needs ``gatewaykit[postgres]``).
    ``options`` go to the backend's constructor.
    """
    if not isinstance(url, str) or "://" not in url:
        raise InvalidLedgerURLError(
            f"not a ledger URL: {url!r}; use sqlite:///path.db, sqlite://:memory: or "
            "postgresql://user@host/dbname"
        )
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "sqlite":
        from gatewaykit.ledger.sqlite import SQLiteLedger

        if rest == ":memory:" or rest == "/:memory:":
            return SQLiteLedger(":memory:", **options)
        if not rest.startswith("/") or rest == "/":
            raise InvalidLedgerURLError(
                f"not a SQLite URL: {url!r}; use sqlite:///path.db (three slashes) or "
                "sqlite://:memory:"
            )
        return SQLiteLedger(rest[1:], **options)
    if scheme in ("postgresql", "postgres"):
        try:
            from gatewaykit.ledger.postgres import PostgresLedger
        except ImportError as exc:  # asyncpg missing
            raise InvalidLedgerURLError(
                f"PostgreSQL ledgers need the extra: pip install 'gatewaykit[postgres]' ({exc})"
            ) from None
        return PostgresLedger(url, **options)
    raise InvalidLedgerURLError(
        f"unknown ledger URL scheme {scheme!r}; use sqlite:///path.db, sqlite://:memory: or "
        "postgresql://..."
    )
