"""The outbox contract: a durable queue of reports waiting for the control plane's ack.

A report is written to the outbox in one durable insert before the request's settlement
returns, and leaves it only when the control plane acknowledges it (or rejects it for
good, which parks it as a dead letter). A background :class:`~gatewaykit.outbox.OutboxSender`
delivers what is due. Nothing is ever kept only in memory, so a crash or a restart loses
nothing: an item claimed by a process that died becomes due again when its lease runs out.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from gatewaykit.errors import ConfigurationError

__all__ = ["Outbox", "OutboxItem", "validate_key", "validate_table"]

_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def validate_key(key: str) -> str:
    """An idempotency key: a non-empty string of at most 512 characters."""
    if not isinstance(key, str) or not key or len(key) > 512 or key.isspace():
        raise ConfigurationError(f"an outbox key must be a non-empty string of ≤512 chars: {key!r}")
    return key


def validate_table(table: str) -> str:
    """A table name safe to interpolate into SQL (lower-case identifier)."""
    if not isinstance(table, str) or not _TABLE.match(table):
        raise ConfigurationError(
            f"outbox table must be a lower-case SQL identifier such as 'gatewaykit_outbox', "
            f"got {table!r}"
        )
    return table


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxItem:
    """One queued report. ``attempts`` counts deliveries that failed so far."""

    key: str
    payload: Mapping[str, Any]
    enqueued_at: datetime
    attempts: int
    last_error: str | None
    dead: bool = False


@runtime_checkable
class Outbox(Protocol):
    """A durable queue keyed by idempotency key. Times are the store's clock.

    An item is *live* until it is acknowledged (deleted) or parked (dead letter). A live
    item is *due* when its next-attempt time has passed; :meth:`claim` hands out due items
    and leases them (pushes their next attempt ``lease`` seconds out), so two senders
    sharing a store rarely send the same item twice, and a sender that dies mid-delivery
    only delays it.
    """

    async def open(self) -> None:
        """Connect and create the table if needed. Idempotent."""

    async def close(self) -> None:
        """Disconnect. Idempotent. Queued items stay in the store."""

    async def __aenter__(self) -> Outbox: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    @property
    def is_open(self) -> bool: ...

    async def enqueue(self, key: str, payload: Mapping[str, Any]) -> bool:
        """Durably store a report, due now. False (and nothing changes) if ``key`` is queued."""

    async def claim(self, *, limit: int, lease: float, due_only: bool = True) -> list[OutboxItem]:
        """Up to ``limit`` live items, oldest first, leased for ``lease`` seconds.

        ``due_only=False`` also takes items still waiting for their backoff (a shutdown flush).
        """

    async def ack(self, key: str) -> None:
        """The report was acknowledged: remove it. Unknown keys are ignored."""

    async def retry_later(self, key: str, *, delay: float, error: str) -> None:
        """A delivery failed: count it, remember why, make it due ``delay`` seconds from now."""

    async def park(self, key: str, *, error: str) -> None:
        """The control plane rejected the report for good: keep it as a dead letter."""

    async def reschedule_all(self) -> int:
        """Make every live item due now (used when a sender starts). Returns how many."""

    async def requeue_dead(self) -> int:
        """Move every dead letter back to the live queue, due now. Returns how many."""

    async def size(self) -> int:
        """How many live (undelivered, not parked) items there are."""

    async def dead_count(self) -> int:
        """How many dead letters there are."""

    async def oldest_age(self) -> float | None:
        """Seconds since the oldest live item was enqueued; None when the queue is empty."""

    async def next_due_in(self) -> float | None:
        """Seconds until the earliest live item is due (0 if overdue); None when empty."""

    async def dead_letters(self, *, limit: int = 100) -> list[OutboxItem]:
        """The parked items, oldest first, for inspection."""
