"""``open_outbox(url)``: pick an outbox backend from a URL, like ``open_ledger``."""

from __future__ import annotations

from typing import Any

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox.base import Outbox

__all__ = ["open_outbox"]


def open_outbox(url: str, **options: Any) -> Outbox:
    """An outbox for ``url``, not yet connected: enter it with ``async with`` or ``.open()``.

    ``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` also works),
    ``sqlite://:memory:`` (not durable: tests only), ``postgresql://user@host/db`` (needs
    ``gatewaykit[postgres]``). ``options`` go to the backend's constructor (e.g. ``table``).
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"not an outbox URL: {url!r}; use sqlite:///path.db, sqlite://:memory: or "
            "postgresql://user@host/dbname"
        )
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "sqlite":
        from gatewaykit.outbox.sqlite import SQLiteOutbox

        if rest in (":memory:", "/:memory:"):
            return SQLiteOutbox(":memory:", **options)
        if not rest.startswith("/") or rest == "/":
            raise ConfigurationError(
                f"not a SQLite URL: {url!r}; use sqlite:///path.db (three slashes) or "
                "sqlite://:memory:"
            )
        return SQLiteOutbox(rest[1:], **options)
    if scheme in ("postgresql", "postgres"):
        try:
            from gatewaykit.outbox.postgres import PostgresOutbox
        except ImportError as exc:  # asyncpg missing
            raise ConfigurationError(
                f"a PostgreSQL outbox needs the extra: pip install 'gatewaykit[postgres]' ({exc})"
            ) from None
        return PostgresOutbox(url, **options)
    raise ConfigurationError(
        f"unknown outbox URL scheme {scheme!r}; use sqlite:///path.db, sqlite://:memory: or "
        "postgresql://..."
    )
