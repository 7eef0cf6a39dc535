"""Counting refused requests in process and adding them to the ledger now and then.

The admin page's Overview shows the denials of the last 24 hours, across every gateway
process sharing the ledger. Writing one row per refusal would let a flood of bad keys
become a flood of ledger writes, so :class:`DenialCounter` counts in memory per (UTC
hour, reason) — one dict increment on the refusal path, nothing on the success path —
and a background loop adds the aggregate to the ledger every ``interval`` seconds and
once more when it closes (``DenialStore.add_denials``: an upsert that adds). Reasons are the
bounded ``reason`` labels of ``gatewaykit_denials_total``, so the stored rows are bounded
too: six per hour at most.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

import anyio

from gatewaykit.errors import ConfigurationError, ErrorKind, GatewayKitError
from gatewaykit.ledger.base import DenialStore
from gatewaykit.observability.recorder import denial_reason
from gatewaykit.resource import BackgroundWorker

__all__ = ["DenialCounter"]

logger = logging.getLogger("gatewaykit.denials")


class DenialCounter(BackgroundWorker):
    """Counts refusals per (UTC hour, reason) and flushes them to ``ledger``.

    Give it to ``GatewayMiddleware(..., denials=counter)`` and enter it (``async with``)
    in the app's lifespan, inside the ledger's, so its last flush finds the ledger open.
    A flush that fails keeps its counts for the next one.
    """

    def __init__(self, ledger: DenialStore, *, interval: float = 10.0) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
            raise ConfigurationError("the denial flush interval must be a positive number")
        self.ledger = ledger
        self.interval = float(interval)
        #: (hours since the epoch, reason) -> refusals not yet flushed.
        self._counts: dict[tuple[int, str], int] = {}

    def refused(self, kind: ErrorKind) -> None:
        """Count one refusal (called by the middleware as it sends the error)."""
        key = (int(time.time()) // 3600, denial_reason(kind))
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1

    async def flush(self) -> None:
        """Add the counts so far to the ledger (nothing is written when there are none)."""
        counts, self._counts = self._counts, {}
        if not counts:
            return
        rows = {(_hour(hour), reason): n for (hour, reason), n in counts.items()}
        try:
            await self.ledger.add_denials(rows)
        except GatewayKitError as exc:
            for key, n in counts.items():  # keep them for the next flush
                self._counts[key] = self._counts.get(key, 0) + n
            unsaved = sum(rows.values())
            logger.warning("recording %d denials failed; retrying later: %s", unsaved, exc)

    async def _run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            await self.flush()

    async def _stopped(self) -> None:
        await self.flush()


def _hour(hours: int) -> datetime:
    return datetime.fromtimestamp(hours * 3600, timezone.utc)
