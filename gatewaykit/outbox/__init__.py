"""Durable outboxes for usage reports, and the sender that delivers them.

``open_outbox("sqlite:///outbox.db")`` (or ``postgresql://…``) gives an :class:`Outbox`;
:class:`OutboxSender` delivers its items with backoff until they are acknowledged.
The built-in outboxes also keep open admissions (:class:`AdmissionStore`), which
:class:`AdmissionKeeper` heart-beats and recovers, so an admitted request gets its report
even when the process serving it dies.
``PostgresOutbox`` is imported on first use, so asyncpg stays optional.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gatewaykit.outbox.admissions import AdmissionKeeper
from gatewaykit.outbox.base import Admission, AdmissionStore, Outbox, OutboxItem
from gatewaykit.outbox.sender import OutboxSender, RetryPolicy
from gatewaykit.outbox.sqlite import SQLiteOutbox
from gatewaykit.outbox.url import open_outbox

if TYPE_CHECKING:
    from gatewaykit.outbox.postgres import PostgresOutbox

__all__ = [
    "Admission",
    "AdmissionKeeper",
    "AdmissionStore",
    "Outbox",
    "OutboxItem",
    "OutboxSender",
    "PostgresOutbox",
    "RetryPolicy",
    "SQLiteOutbox",
    "open_outbox",
]


def __getattr__(name: str) -> Any:
    if name == "PostgresOutbox":
        from gatewaykit.outbox.postgres import PostgresOutbox

        return PostgresOutbox
    raise AttributeError(f"module 'gatewaykit.outbox' has no attribute {name!r}")
