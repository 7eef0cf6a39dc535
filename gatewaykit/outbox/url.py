"""``open_outbox(url)``: pick an outbox backend from a URL, like ``open_ledger``."""

from __future__ import annotations

from typing import Any, cast

from gatewaykit.outbox.base import Outbox
from gatewaykit.urls import open_store

__all__ = ["open_outbox"]


def open_outbox(url: str, **options: Any) -> Outbox:
    """An outbox for ``url``, not yet connected: enter it with ``async with`` or ``.open()``.

    ``sqlite:///relative/or/absolute.db`` (``sqlite:////abs/path.db`` also works),
    ``sqlite://:memory:`` (not durable: tests only), ``postgresql://user@host/db`` (needs
    ``gatewaykit[postgres]``). ``options`` go to the backend's constructor (e.g. ``table``).
    """
    outbox = open_store(
        url,
        options,
        what="outbox",
        sqlite="gatewaykit.outbox.sqlite:SQLiteOutbox",
        postgresql="gatewaykit.outbox.postgres:PostgresOutbox",
    )
    return cast(Outbox, outbox)
