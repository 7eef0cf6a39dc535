"""StandaloneSettlement: one request's hold settled, or released, in the local ledger.

Built by :class:`~gatewaykit.modes.standalone.StandaloneMode` for each admitted request;
the charge policy itself is :func:`gatewaykit.modes.charging.charge_for` (pure, tested
without a ledger).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from decimal import Decimal
from typing import TypeVar

import anyio

from gatewaykit.errors import HoldClosedError, LedgerUnavailableError
from gatewaykit.ledger.base import Ledger, ResponseContext, UsageRecord
from gatewaykit.modes.charging import DisconnectPolicy, MissingUsagePolicy, charge_for
from gatewaykit.pricing import ModelPrice
from gatewaykit.ratelimit import RateLimit, RateLimiter
from gatewaykit.settlement import (
    RequestEstimate,
    Settlement,
    SettlementOutcome,
    SettlementStatus,
)
from gatewaykit.stored_context import ContextPlan, context_to_remember
from gatewaykit.usage import Usage, UsageSource

__all__ = ["REMAINING_HEADER", "StandaloneSettlement", "while_unavailable"]

logger = logging.getLogger("gatewaykit.standalone")

T = TypeVar("T")

#: The tightest limited budget's remaining USD after the hold (StandaloneMode's header).
REMAINING_HEADER = "x-gatewaykit-budget-remaining"

#: Pauses between attempts to write to a briefly unreachable ledger (about 1.3 s in all).
RETRY_DELAYS = (0.05, 0.25, 1.0)


class StandaloneSettlement(Settlement):
    """Settles one ledger hold; writes the usage record in the same ledger call.

    ``price`` None means the request is unbudgeted (held and charged 0, usage still
    recorded). A ledger failure while settling is logged (request id only) and the hold
    is left to expire: the response is never broken by bookkeeping.

    ``scopes`` is given only for a request admitted without a hold (``fail_open`` while
    the ledger was down): its charge is then booked afterwards as a zero hold settled at
    the actual cost (an overrun), if the ledger is back.

    ``response_headers`` are the response's headers (StandaloneMode's budget headers in
    them): a refund before the response started gives the hold back to the reported
    ``x-gatewaykit-budget-remaining``, so a refunded error never reports the released hold.

    ``context_plan`` is given for OpenAI responses requests: on success, the context a
    later request continuing this response (the id an adapter noted with
    ``note_response``) or its conversation will be billed for is written with the settle.
    Other outcomes remember nothing, so such an id stays unknown (held at the context
    window, or refused) rather than remembered too small.

    ``token_limits`` are the rate limits the request was admitted under, when some count
    tokens: once charged, ``rate_limiter`` replaces its estimate there with the tokens
    charged.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        request_id: str,
        estimate: RequestEstimate,
        price: ModelPrice | None,
        model: str,
        endpoint: str,
        key_id: str | None = None,
        user: str | None = None,
        missing_usage: MissingUsagePolicy = "estimate",
        disconnect: DisconnectPolicy = "charge_observed",
        hold_ttl: float = 600,
        scopes: Sequence[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        context_plan: ContextPlan | None = None,
        response_headers: MutableMapping[str, str] | None = None,
        rate_limiter: RateLimiter | None = None,
        token_limits: Sequence[RateLimit] = (),
    ) -> None:
        super().__init__(request_id=request_id, estimate=estimate)
        self.rate_limiter = rate_limiter
        self.token_limits = tuple(token_limits)
        self.response_headers = response_headers
        self.context_plan = context_plan
        self.ledger = ledger
        self.price = price
        self.model = model
        self.endpoint = endpoint
        self.key_id = key_id
        self.user = user
        self.missing_usage = missing_usage
        self.disconnect = disconnect
        self.hold_ttl = hold_ttl
        self.unheld_scopes = None if scopes is None else tuple(scopes)
        #: How often GatewayMiddleware should extend the hold while the response lives.
        self.heartbeat_interval = hold_ttl / 3 if scopes is None else None
        self._clock = clock
        self._started = clock()

    async def heartbeat(self) -> None:
        if self.done or self.unheld_scopes is not None:
            return
        with contextlib.suppress(HoldClosedError):
            await self.ledger.extend(self.request_id, ttl=self.hold_ttl)

    async def _finish(
        self, status: SettlementStatus, usage: Usage | None, error: str | None
    ) -> SettlementOutcome:
        decided = charge_for(
            status,
            usage,
            error,
            estimate=self.estimate,
            price=self.price,
            committed=self.committed,
            upstream_contacted=self.upstream_contacted,
            output_chars=self.output_chars,
            partial_usage=self.partial_usage,
            missing_usage=self.missing_usage,
            disconnect=self.disconnect,
        )
        charge, amount, error = decided.usage, decided.amount, decided.error
        record = UsageRecord(
            request_id=self.request_id,
            model=self.model,
            endpoint=self.endpoint,
            status=status,
            usage_source=(charge.source.value if charge else UsageSource.NONE.value),
            key_id=self.key_id,
            user=self.user,
            input_tokens=charge.input_tokens if charge else 0,
            output_tokens=charge.output_tokens if charge else 0,
            cache_read_tokens=charge.cache_read_tokens if charge else 0,
            cache_write_tokens=charge.cache_write_tokens if charge else 0,
            cost=amount if amount is not None else Decimal(0),
            error=error,
            latency_ms=int((self._clock() - self._started) * 1000),
            response_context=self._response_context(status, charge),
        )
        if self.rate_limiter is not None:  # the tokens charged replace the estimate
            try:
                await self.rate_limiter.settle(
                    self.request_id, self.token_limits, charge.total_tokens if charge else 0
                )
            except Exception as exc:  # a custom limiter's failure: the estimate stays counted
                logger.warning(
                    "could not settle request %s's tokens with the rate limiter: %s",
                    self.request_id,
                    type(exc).__name__,
                )
        try:
            amount = await self._write(amount, record)
        except Exception as exc:
            logger.error(
                "could not settle request %s (%s): %s; the hold will expire on its own",
                self.request_id,
                status,
                type(exc).__name__,
            )
            return SettlementOutcome(
                status=status,
                charged=Decimal(0),
                usage=charge,
                refunded=False,
                error=f"settlement not recorded: {type(exc).__name__}",
                # Unrecorded: the adapters withhold the answer (it is not free). A request
                # admitted without a hold (fail_open) is served and its charge lost, as
                # configured.
                recorded=self.unheld_scopes is not None,
            )
        if amount is None:
            self._give_back_headroom()
        return SettlementOutcome(
            status=status,
            charged=amount if amount is not None else Decimal(0),
            usage=charge,
            refunded=amount is None,
            error=error,
        )

    def _give_back_headroom(self) -> None:
        """The refund returns the hold to every scope, so to the reported tightest one."""
        headers = self.response_headers
        remaining = headers.get(REMAINING_HEADER) if headers is not None else None
        if headers is not None and remaining is not None and not self.committed:
            headers[REMAINING_HEADER] = str(Decimal(remaining) + self.estimate.amount)

    def _response_context(
        self, status: SettlementStatus, charge: Usage | None
    ) -> ResponseContext | None:
        """What to remember of a successful responses request's context (else None)."""
        if self.context_plan is None or status != "success" or charge is None:
            return None
        return context_to_remember(self.context_plan, charge, self.response_id)

    async def _write(self, amount: Decimal | None, record: UsageRecord) -> Decimal | None:
        """Release (None) or settle at ``amount``; returns what was charged.

        A store that is briefly unreachable is retried (every call is idempotent by hold
        id): a hold left to expire would never be charged at all.
        """
        return await while_unavailable(
            lambda: self._write_once(amount, record), "settling", self.request_id
        )

    async def _write_once(self, amount: Decimal | None, record: UsageRecord) -> Decimal | None:
        if amount is None:
            await self.ledger.release(self.request_id, record=record)
            return None
        if self.unheld_scopes is not None:
            await self.ledger.reserve(
                self.request_id, self.unheld_scopes, Decimal(0), ttl=self.hold_ttl
            )
        hold = await self.ledger.settle(self.request_id, amount, record=record)
        charged: Decimal = hold.charged
        return charged


async def while_unavailable(write: Callable[[], Awaitable[T]], doing: str, request_id: str) -> T:
    """``write()``, tried again after each of :data:`RETRY_DELAYS` while the ledger is
    unreachable (the writes are idempotent by hold id); its last failure is raised."""
    delays = iter(RETRY_DELAYS)
    while True:
        try:
            return await write()
        except LedgerUnavailableError:
            delay = next(delays, None)
            if delay is None:
                raise
            logger.warning(
                "ledger unavailable while %s request %s; retrying in %ss", doing, request_id, delay
            )
            await anyio.sleep(delay)
