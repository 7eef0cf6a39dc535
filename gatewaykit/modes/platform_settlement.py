"""PlatformSettlement: a request settles by queueing its usage report durably."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Protocol

from gatewaykit.context import GatewayContext
from gatewaykit.errors import ConfigurationError
from gatewaykit.modes.platform_reports import usage_report
from gatewaykit.settlement import (
    RequestEstimate,
    Settlement,
    SettlementOutcome,
    SettlementStatus,
)
from gatewaykit.upstream import Attempt
from gatewaykit.usage import Usage

__all__ = ["ATTEMPT_ID_HEADER", "PlatformSettlement", "ReportQueue"]

logger = logging.getLogger("gatewaykit.platform")

#: Response header naming the attempt that served the request (set by the adapters as
#: they try each attempt; PlatformMode presets it to the first).
ATTEMPT_ID_HEADER = "x-gatewaykit-attempt-id"


class ReportQueue(Protocol):
    """Where a settlement's report goes: :class:`~gatewaykit.modes.platform.PlatformMode`."""

    async def enqueue_report(self, key: str, payload: Mapping[str, Any]) -> None: ...

    async def complete_admission(
        self, request_id: str, key: str, payload: Mapping[str, Any]
    ) -> bool: ...


class PlatformSettlement(Settlement):
    """Settles by queueing one usage report in the mode's durable outbox.

    The reported attempt is the one that served, or the last one tried: the adapters call
    ``note_attempt`` as they try each, which also names it in the response's
    ``x-gatewaykit-attempt-id`` header.
    ``charged`` in the outcome is always 0 — the control plane prices the report.
    ``admitted``: the mode recorded this request's admission in the outbox, so the report
    is queued by closing it (and not at all if another process already reported it).
    """

    def __init__(
        self,
        *,
        mode: ReportQueue,
        request_id: str,
        estimate: RequestEstimate,
        attempts: tuple[Attempt, ...],
        admitted: bool = False,
    ) -> None:
        super().__init__(request_id=request_id, estimate=estimate)
        if not attempts:
            raise ConfigurationError("a PlatformSettlement needs at least one attempt")
        self._mode = mode
        self._attempts = attempts
        self._admitted = admitted
        self._context: GatewayContext | None = None
        self.report_key: str | None = None

    def bind(self, context: GatewayContext) -> None:
        """Name the attempt being tried in this context's response headers, for the client."""
        self._context = context

    def note_attempt(self, attempt: Attempt) -> None:
        super().note_attempt(attempt)
        if self._context is not None:
            self._context.response_headers[ATTEMPT_ID_HEADER] = attempt.attempt_id

    @property
    def attempt_id(self) -> str:
        """The attempt that served (or was tried last); the first until an adapter says."""
        attempt = self.attempt
        if attempt is not None and attempt in self._attempts:
            return attempt.attempt_id
        return self._attempts[0].attempt_id

    async def _finish(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        if usage is None and status in ("error", "incomplete"):
            usage = self.partial_usage
        attempt_id = self.attempt_id
        report = usage_report(
            request_id=self.request_id,
            attempt_id=attempt_id,
            status=status,
            usage=usage,
            error=error,
            observed={
                "upstream_contacted": self.upstream_contacted,
                "committed": self.committed,
                "output_chars": self.output_chars,
                "prompt_tokens_estimate": self.estimate.prompt_tokens,
            },
        )
        key = f"{self.request_id}:{attempt_id}"
        self.report_key = key
        recorded = True
        try:
            await self._queue_report(key, report)
        except Exception:
            # Nothing durable could be written: the log line is the last copy of the report,
            # and the adapters withhold the answer (unrecorded, it would be free).
            recorded = False
            logger.exception(
                "could not store usage report %s; report: %s",
                key,
                json.dumps(report, separators=(",", ":")),
            )
        return SettlementOutcome(
            status=status,
            charged=Decimal(0),
            usage=usage,
            refunded=status == "error" and not self.committed,
            error=error,
            recorded=recorded,
        )

    async def _queue_report(self, key: str, report: Mapping[str, Any]) -> None:
        if not self._admitted:
            await self._mode.enqueue_report(key, report)
        elif not await self._mode.complete_admission(self.request_id, key, report):
            self.report_key = None
            logger.warning(
                "usage report %s not queued: another gateway process had already reported "
                "request %s as incomplete (this process missed its heart-beats for longer "
                "than the admission lease); report: %s",
                key,
                self.request_id,
                json.dumps(report, separators=(",", ":")),
            )
