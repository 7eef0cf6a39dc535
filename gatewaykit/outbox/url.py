"""``open_outbox(url)``: pick an outbox backend from a URL, like ``open_ledger``."""

from __future__ import annotations

from typing import Any

from gatewaykit.errors import ConfigurationError
from gatewaykit.outbox.base import Outbox
from gatewaykit.urls import store_target

__all__ = ["open_outbox"]


def open_outbox(url: str, **options: Any) -> Outbox:
    """An outbox for ``url``, not yet connected: enter it with ``async with`` or ``.open()``.

    ``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` also works),
    ``sqlite://:memory:`` (not durable: tests only), ``postgresql://user@host/db`` (needs
    ``gatewaykit[postgres]``). ``options`` go to the backend's constructor (e.g. ``table``).
    """
    kind, target = store_target(url, what="outbox")
    if kind == "sqlite":
        from gatewaykit.outbox.sqlite import SQLiteOutbox

        return SQLiteOutbox(target, **options)
    try:
        from gatewaykit.outbox.postgres import PostgresOutbox
    except ImportError as exc:  # asyncpg missing
        raise ConfigurationError(
            f"a PostgreSQL outbox needs the extra: pip install 'gatewaykit[postgres]' ({exc})"
        ) from None
    return PostgresOutbox(target, **options)
