"""The settlement: the one object a handler talks to about money.

A settlement wraps one hold (standalone) or one correlation (platform) and moves through
a small state machine (docs/settlement.md)::

    open ──on_first_chunk──▶ committed
      │                         │
      └──── on_success / on_error / on_no_usage / on_incomplete ────▶ finished (once)

The first terminal hook wins; later calls return the first outcome. The transition runs
in a task of its own, awaited through ``asyncio.shield``, so no cancellation (a client
disconnect, a server shutting down) can interrupt the ledger write.
Subclasses implement :meth:`Settlement._finish`; this base owns the state machine.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
from collections.abc import MutableMapping
from decimal import Decimal
from typing import Any, Literal, Protocol

from gatewaykit.context import get_context
from gatewaykit.errors import describe_error
from gatewaykit.upstream import Attempt
from gatewaykit.usage import Usage

__all__ = [
    "RequestEstimate",
    "RequestObserver",
    "Settlement",
    "SettlementOutcome",
    "SettlementStatus",
    "UnmeteredSettlement",
    "get_settlement",
]

logger = logging.getLogger("gatewaykit.settlement")

SettlementStatus = Literal["success", "error", "no_usage", "incomplete"]


@dataclasses.dataclass(frozen=True, slots=True)
class RequestEstimate:
    """What the request was expected to cost when it was admitted."""

    prompt_tokens: int
    max_output_tokens: int
    amount: Decimal  # USD held (0 when unbudgeted)


@dataclasses.dataclass(frozen=True, slots=True)
class SettlementOutcome:
    """How a request was settled. ``charged`` is 0 when the hold was refunded.

    ``recorded`` is False when the outcome could not be made durable (the ledger or
    outbox failed for good): the adapters then withhold the bytes that would complete
    the response, so no answer is delivered without its charge on record.
    """

    status: SettlementStatus
    charged: Decimal
    usage: Usage | None
    refunded: bool
    error: str | None = None
    recorded: bool = True


class RequestObserver(Protocol):
    """What metrics and tracing learn from a settlement (set by GatewayMiddleware).

    Called synchronously; an observer must be cheap and must not raise.
    """

    def attempt(self, attempt: Attempt) -> None:
        """``attempt`` is being tried now (the previous one, if any, failed)."""

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Add trace-propagation headers to the upstream request of the current attempt."""

    def settling(self) -> None:
        """The terminal transition starts."""

    def settled(self, outcome: SettlementOutcome | None) -> None:
        """The terminal transition ended: its outcome, or None when it raised."""


class Settlement(abc.ABC):
    """State machine shared by every mode; see the module docstring."""

    #: The provider's id of the response being served (``resp_…`` of OpenAI responses),
    #: once an adapter noted it; a later request may continue that response.
    response_id: str | None = None
    #: Told about attempts and the outcome when metrics or tracing are on; None costs
    #: nothing (GatewayMiddleware sets it per request).
    observer: RequestObserver | None = None

    def __init__(self, *, request_id: str, estimate: RequestEstimate) -> None:
        self.request_id = request_id
        self.estimate = estimate
        self.committed = False
        self.upstream_contacted = False
        self.attempt: Attempt | None = None
        self.output_chars = 0
        self.partial_usage: Usage | None = None
        self._outcome: SettlementOutcome | None = None
        self._finishing: asyncio.Future[SettlementOutcome] | None = None

    def __repr__(self) -> str:
        state = "committed" if self.committed else "open"
        if self._outcome is not None:
            state = self._outcome.status
        return f"<{type(self).__name__} {self.request_id} {state}>"

    # -- observations (cheap, synchronous; used to estimate what was consumed) ----------
    def note_upstream_contacted(self) -> None:
        """The request left for the provider: from now on the prompt may be billed."""
        self.upstream_contacted = True

    def note_attempt(self, attempt: Attempt) -> None:
        """``attempt`` is the one being tried now; the last noted is the one that served."""
        self.attempt = attempt
        if self.observer is not None:
            self.observer.attempt(attempt)

    def note_output(self, chars: int) -> None:
        """``chars`` characters of generated output reached the client."""
        self.output_chars += chars

    def note_usage(self, usage: Usage) -> None:
        """The provider reported (possibly partial) usage before the call ended."""
        self.partial_usage = usage

    def note_response(self, response_id: str) -> None:
        """The provider named the response it is creating (the first id noted stays)."""
        if self.response_id is None and isinstance(response_id, str) and response_id:
            self.response_id = response_id

    @property
    def outcome(self) -> SettlementOutcome | None:
        return self._outcome

    @property
    def done(self) -> bool:
        return self._outcome is not None

    # -- hooks -----------------------------------------------------------------------
    async def on_first_chunk(self) -> None:
        """The first byte of the response is about to go out; errors are in-band after."""
        self.upstream_contacted = True
        self.committed = True

    async def on_success(self, usage: Usage) -> SettlementOutcome:
        return await self._terminal("success", usage, None)

    async def on_error(
        self, error: BaseException | str, usage: Usage | None = None
    ) -> SettlementOutcome:
        """Before commit nothing was delivered: refund. After: charge what was consumed."""
        reason = error if isinstance(error, str) else describe_error(error)
        return await self._terminal("error", usage, reason)

    async def on_no_usage(self) -> SettlementOutcome:
        return await self._terminal("no_usage", None, None)

    async def on_incomplete(self, partial: Usage | None = None) -> SettlementOutcome:
        return await self._terminal("incomplete", partial, None)

    async def heartbeat(self) -> None:
        """Keep the hold alive while a long response streams (no-op unless overridden)."""

    async def _terminal(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        if self._outcome is not None:
            return self._outcome
        # The transition runs as a task of its own, awaited through asyncio.shield: no
        # cancellation of the caller (anyio's or a plain task.cancel(), which an anyio
        # shield would not stop) can interrupt the ledger write, and a hook called while
        # another settles waits for that one's outcome (the first wins).
        finishing = self._finishing
        if finishing is None:
            # Referenced by the settlement, and while it waits by what it awaits (the
            # ledger's pending operation): never collected mid-run.
            finishing = self._finishing = asyncio.ensure_future(
                self._finish_once(status, usage, error)
            )
        try:
            return await asyncio.shield(finishing)
        except asyncio.CancelledError:
            # Nobody will await the outcome now: a transition that fails is logged.
            finishing.add_done_callback(self._log_failure)
            raise

    def _log_failure(self, finishing: asyncio.Future[SettlementOutcome]) -> None:
        if not finishing.cancelled() and finishing.exception() is not None:
            logger.error(
                "settling request %s failed after its caller was cancelled: %s",
                self.request_id,
                type(finishing.exception()).__name__,
            )

    async def _finish_once(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        observer = self.observer
        if observer is not None:
            observer.settling()
        try:
            self._outcome = await self._finish(status, usage, error)
        finally:
            if self._outcome is None:  # failed: a later hook may try again
                self._finishing = None
            if observer is not None:
                observer.settled(self._outcome)
        return self._outcome

    @abc.abstractmethod
    async def _finish(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        """Perform the terminal transition exactly once (in its own task, shielded)."""


class UnmeteredSettlement(Settlement):
    """The settlement of a request nobody pays for (Anthropic's count_tokens): no hold,
    no charge, no usage record; every outcome charges 0."""

    def __init__(self, *, request_id: str) -> None:
        super().__init__(request_id=request_id, estimate=_FREE)

    async def _finish(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        return SettlementOutcome(status, Decimal(0), usage, refunded=False, error=error)


_FREE = RequestEstimate(prompt_tokens=0, max_output_tokens=0, amount=Decimal(0))


def get_settlement(conn: Any) -> Settlement:
    """The settlement of a request; raises SettlementMissingError naming the middleware."""
    return get_context(conn).settlement
