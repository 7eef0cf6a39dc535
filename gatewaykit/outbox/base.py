"""The outbox contract: a durable queue of reports waiting for the control plane's ack.

A report is written to the outbox in one durable insert before the request's settlement
returns, and leaves it only when the control plane acknowledges it (or rejects it for
good, which parks it as a dead letter). A background :class:`~gatewaykit.outbox.OutboxSender`
delivers what is due. Nothing is ever kept only in memory, so a crash or a restart loses
nothing: an item claimed by a process that died becomes due again when its lease runs out.

An outbox may also keep *open admissions* (:class:`AdmissionStore`): a durable note, written
before a request goes upstream, that the control plane admitted it and a report is owed.
Queueing the report closes the note in the same transaction; notes left open by a process
that stopped heart-beating are turned into reports by whoever recovers them. So every
admitted request gets exactly one report, even across a crash.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from gatewaykit.errors import ConfigurationError

__all__ = [
    "Admission",
    "AdmissionStore",
    "Outbox",
    "OutboxItem",
    "ReportBuilder",
    "admission_tables",
    "validate_key",
    "validate_table",
]

_TABLE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: Suffixes of the tables an outbox keeps beside its own (open admissions, live instances).
_ADMISSIONS_SUFFIX = "_admissions"
_INSTANCES_SUFFIX = "_instances"


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


def admission_tables(table: str) -> tuple[str, str]:
    """The names of an outbox table's admissions and instances tables (``<table>_admissions``,
    ``<table>_instances``); the outbox table name may therefore be at most 52 characters."""
    longest = max(len(_ADMISSIONS_SUFFIX), len(_INSTANCES_SUFFIX))
    if len(table) > 63 - longest:
        raise ConfigurationError(
            f"outbox table name {table!r} is too long: at most {63 - longest} characters, since "
            f"the outbox also keeps {table}{_ADMISSIONS_SUFFIX} and {table}{_INSTANCES_SUFFIX}"
        )
    return table + _ADMISSIONS_SUFFIX, table + _INSTANCES_SUFFIX


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

    async def aclose(self) -> None:
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


@dataclasses.dataclass(frozen=True, slots=True)
class Admission:
    """An open admission: the control plane admitted ``request_id`` and no report is queued yet.

    ``owner`` is the instance id of the gateway process serving it; ``details`` is what that
    process wrote down at admission (PlatformMode: the attempt ids, model, endpoint and the
    prompt estimate), enough to build a report without it.
    """

    request_id: str
    owner: str
    admitted_at: datetime
    details: Mapping[str, Any]


#: Builds the report that replaces a recovered admission: ``(idempotency key, payload)``.
#: Called inside the store's transaction (in a worker thread for SQLite): keep it pure.
ReportBuilder = Callable[[Admission], tuple[str, Mapping[str, Any]]]


@runtime_checkable
class AdmissionStore(Protocol):
    """Open admissions kept in the outbox's own store, so a report and the admission it
    closes are written in one transaction. Times are the store's clock.

    Liveness: every gateway process (*instance*) sharing the store calls :meth:`heartbeat`
    regularly; an admission whose owner has not heart-beaten for ``stale_after`` seconds
    (or has no instance row and was admitted that long ago) is *stale* and may be recovered
    by any process. A process recovers its own admissions only when it stops (or, with a
    stable instance id, when it starts again after a crash).
    """

    async def admit(self, request_id: str, details: Mapping[str, Any], *, owner: str) -> bool:
        """Durably record an open admission (one write, group-committed with the outbox's
        other writes). False, and nothing changes, when ``request_id`` is already open."""

    async def complete(self, request_id: str, key: str, payload: Mapping[str, Any]) -> bool:
        """In one transaction: queue the report (as :meth:`Outbox.enqueue`) and close the
        admission of ``request_id``. Only if that admission is still open: False, and
        nothing is written, when it was already closed — recovered as incomplete by another
        process, whose report then stands as the request's only one."""

    async def recover(
        self, report: ReportBuilder, *, stale_after: float, owner: str | None = None
    ) -> list[str]:
        """Turn stale admissions (and every open admission of ``owner``, if given) into the
        reports ``report`` builds, closing each in the same transaction; forget instances
        that are stale and have nothing open. Returns the keys of the reports queued. Two
        processes recovering at once never both take one admission."""

    async def heartbeat(self, owner: str) -> None:
        """Record that instance ``owner`` is alive now."""

    async def retire(self, owner: str) -> None:
        """Forget instance ``owner`` (it stopped cleanly; recover its admissions first)."""

    async def admissions(self, *, limit: int = 100) -> list[Admission]:
        """The open admissions, oldest first, for inspection."""

    async def admission_count(self) -> int:
        """How many admissions are open."""
