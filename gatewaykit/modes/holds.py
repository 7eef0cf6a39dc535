"""StandaloneMode's last admission step: hold the estimate on every budget, then admit.

One atomic reserve on every scope that applies (``user:<user>``, ``key:<key_id>``,
``team:<team>``), under the caps on requests in flight → 402 with the refusing budget's
numbers, 429 over a cap, or 503 when the ledger is unreachable (unless ``fail_open``).
Under ``over_budget="fit"`` the ledger may hold a smaller output cap, which is written into
the body sent upstream (:mod:`gatewaykit.modes.fitting`). The admitted
:class:`~gatewaykit.context.GatewayContext` carries a :class:`StandaloneSettlement` of the
hold.

A cancellation while the hold is being written (the client left, the server stops)
releases it: the release follows the reserve in the ledger, or leaves a tombstone the
late reserve finds, so nothing stays held — which is why the mode can be awaited without
a shielding task of its own (``StandaloneMode.cancel_safe``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from gatewaykit.context import GatewayContext
from gatewaykit.errors import (
    BudgetExceeded,
    ConcurrencyExceeded,
    ConfigurationError,
    ErrorKind,
    LedgerUnavailableError,
    RequestRejected,
)
from gatewaykit.ledger.base import ApiKeyRecord, Hold, Ledger, UsageRecord, validate_ttl
from gatewaykit.modes.admission import endpoint_name
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.charging import DisconnectPolicy, MissingUsagePolicy
from gatewaykit.modes.fitting import (
    FITTED_FORMATS,
    MAX_OUTPUT_TOKENS_HEADER,
    least_fitted_tokens,
    output_fit,
    with_output_limit,
)
from gatewaykit.modes.standalone_settlement import (
    REMAINING_HEADER,
    StandaloneSettlement,
    while_unavailable,
)
from gatewaykit.pricing import ModelPrice
from gatewaykit.ratelimit import RateLimit, RateLimiter
from gatewaykit.settlement import RequestEstimate
from gatewaykit.stored_context import ContextPlan
from gatewaykit.upstream import Attempt

__all__ = ["BudgetHolder", "OverBudgetPolicy"]

logger = logging.getLogger("gatewaykit.standalone")

#: A request whose worst case does not fit its budgets: ``"refuse"`` it (402), or ``"fit"``
#: a smaller output cap into what is left (:mod:`gatewaykit.modes.fitting`).
OverBudgetPolicy = Literal["refuse", "fit"]


class BudgetHolder:
    """Holds a request's estimate in the ledger and builds its admitted context."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        hold_ttl: float,
        missing_usage: MissingUsagePolicy,
        disconnect: DisconnectPolicy,
        over_budget: OverBudgetPolicy,
        min_output_tokens: int,
        user_max_concurrent: int | None,
        budget_headers: bool,
        fail_open: bool,
        rate_limiter: RateLimiter,
        clock: Callable[[], float],
    ) -> None:
        if missing_usage not in ("estimate", "hold", "allow_free", "fail"):
            raise ConfigurationError(
                f"missing_usage must be estimate, hold, allow_free or fail, not {missing_usage!r}"
            )
        if disconnect not in ("charge_observed", "release"):
            raise ConfigurationError(
                f"disconnect must be charge_observed or release, not {disconnect!r}"
            )
        if user_max_concurrent is not None and (
            isinstance(user_max_concurrent, bool)
            or not isinstance(user_max_concurrent, int)
            or user_max_concurrent < 1
        ):
            raise ConfigurationError("user_max_concurrent must be a positive int or None")
        if over_budget not in ("refuse", "fit"):
            raise ConfigurationError(f"over_budget must be refuse or fit, not {over_budget!r}")
        if (
            isinstance(min_output_tokens, bool)
            or not isinstance(min_output_tokens, int)
            or min_output_tokens < 1
        ):
            raise ConfigurationError("min_output_tokens must be a positive int")
        self.ledger = ledger
        self.hold_ttl = validate_ttl(hold_ttl)
        self.missing_usage: MissingUsagePolicy = missing_usage
        self.disconnect: DisconnectPolicy = disconnect
        self.over_budget: OverBudgetPolicy = over_budget
        self.min_output_tokens = min_output_tokens
        self.user_max_concurrent = user_max_concurrent
        self.budget_headers = budget_headers
        self.fail_open = fail_open
        self.rate_limiter = rate_limiter
        self._clock = clock
        #: Cancelled admissions' releases and token returns, referenced until done.
        self._background: set[asyncio.Task[object]] = set()

    async def hold(
        self,
        request: GatewayRequest,
        identity: ApiKeyRecord | None,
        held_estimate: RequestEstimate,
        price: ModelPrice | None,
        attempts: tuple[Attempt, ...],
        user: str,
        key_id: str | None,
        team: str | None,
        context_plan: ContextPlan | None,
        headers: dict[str, str],
        token_limits: tuple[RateLimit, ...],
    ) -> GatewayContext:
        """After the rate limits: hold the estimate on every scope (402/429/503)."""
        fmt = request.format
        amount = held_estimate.amount
        scopes = [f"user:{user}"]
        if key_id is not None:
            scopes.append(f"key:{key_id}")
        if team:
            scopes.append(f"team:{team}")
        held = True
        fit = (
            output_fit(
                held_estimate,
                price,
                choices=request.parsed.choices,
                min_output_tokens=least_fitted_tokens(fmt, request.body, self.min_output_tokens),
            )
            if self.over_budget == "fit" and price is not None and fmt in FITTED_FORMATS
            else None
        )
        body, raw_body = request.body, request.raw_body
        caps = self._caps(identity.max_concurrent if identity else None, key_id, user)
        try:
            if fit is None and caps is None:
                hold = await self.ledger.reserve(
                    request.request_id, scopes, amount, ttl=self.hold_ttl
                )
            else:
                hold = await self.ledger.reserve(
                    request.request_id, scopes, amount, ttl=self.hold_ttl, fit=fit, max_live=caps
                )
        except asyncio.CancelledError:
            self._release_abandoned(request, user, key_id)
            raise
        except BudgetExceeded as exc:
            raise _budget_rejection(exc) from None
        except ConcurrencyExceeded as exc:
            raise RequestRejected(
                ErrorKind.RATE_LIMIT,
                f"too many requests in flight for {exc.scope}: its limit is {exc.limit}; "
                "retry when one has finished",
                headers={"retry-after": "1"},
                details={"scope": exc.scope, "max_concurrent": exc.limit},
            ) from None
        except LedgerUnavailableError:
            if not self.fail_open:
                logger.warning("request %s refused: ledger unavailable", request.request_id)
                raise
            logger.warning(
                "request %s admitted without a hold: ledger unavailable (fail_open)",
                request.request_id,
            )
            held = False
        else:
            if not hold.live:
                raise RequestRejected(
                    ErrorKind.UNAVAILABLE, "the request id was already used; retry the request"
                )
            if fit is not None and (
                hold.amount < amount or request.parsed.max_output_tokens is None
            ):
                # Fitted, or held at the default cap for a request that named none: the
                # body goes upstream re-encoded with the cap held for, so the provider's
                # own default cannot spend past the hold (and the budget).
                tokens = fit.tokens_held(hold.amount)
                assert fmt is not None  # fitted only for FITTED_FORMATS
                body, raw_body = with_output_limit(fmt, request.body, tokens), b""
                headers[MAX_OUTPUT_TOKENS_HEADER] = str(tokens)
                held_estimate = dataclasses.replace(
                    held_estimate,
                    max_output_tokens=tokens * request.parsed.choices,
                    amount=hold.amount,
                )
        if self.budget_headers and held:
            headers.update(_headroom(hold))
        settlement = StandaloneSettlement(
            self.ledger,
            request_id=request.request_id,
            estimate=held_estimate,
            price=price,
            model=request.parsed.model,
            endpoint=endpoint_name(request),
            key_id=key_id,
            user=user,
            missing_usage=self.missing_usage,
            disconnect=self.disconnect,
            hold_ttl=self.hold_ttl,
            scopes=None if held else tuple(scopes),
            context_plan=context_plan,
            response_headers=headers if self.budget_headers and held else None,
            clock=self._clock,
            rate_limiter=self.rate_limiter if token_limits else None,
            token_limits=token_limits,
        )
        return GatewayContext(
            request_id=request.request_id,
            settlement=settlement,
            format=fmt,
            model=request.parsed.model,
            stream=request.parsed.stream,
            body=body,
            raw_body=raw_body,
            attempts=attempts,
            user_id=user,
            key_id=key_id,
            response_headers=headers,
        )

    def _release_abandoned(self, request: GatewayRequest, user: str, key_id: str | None) -> None:
        """Release the hold of a request cancelled while it was being reserved (whether the
        reserve committed, will, or never runs), with its usage record, in the background."""
        record = UsageRecord(
            request_id=request.request_id,
            model=request.parsed.model,
            endpoint=endpoint_name(request),
            status="incomplete",
            usage_source="none",
            key_id=key_id,
            user=user,
        )
        # Retried while the ledger is briefly unreachable, as a settle is: a hold left to
        # its TTL would block its budgets until then.
        release = while_unavailable(
            lambda: self.ledger.release(request.request_id, record=record),
            "releasing the hold of cancelled",
            request.request_id,
        )
        self._in_background(request.request_id, "releasing the hold", release)

    def return_tokens(self, request_id: str, limits: tuple[RateLimit, ...]) -> None:
        """A cancelled admission's token estimate leaves the limiter's window (settled at 0
        tokens; settling an estimate never counted changes nothing)."""
        self._in_background(
            request_id,
            "returning the token estimate",
            self.rate_limiter.settle(request_id, limits, 0),
        )

    def _in_background(self, request_id: str, what: str, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(functools.partial(self._done, request_id, what))

    def _done(self, request_id: str, what: str, task: asyncio.Task[object]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "%s of cancelled request %s failed (%s)",
                what,
                request_id,
                type(task.exception()).__name__,
            )

    def _caps(
        self, key_cap: int | None, key_id: str | None, user: str | None
    ) -> dict[str, int] | None:
        """The caps on requests in flight this request is admitted under (None: none)."""
        user_cap = self.user_max_concurrent if user is not None else None
        if key_cap is None and user_cap is None:
            return None  # the common case: nothing to build
        caps = {}
        if key_cap is not None and key_id is not None:
            caps[f"key:{key_id}"] = key_cap
        if user_cap is not None:
            caps[f"user:{user}"] = user_cap
        return caps


def _headroom(hold: Hold) -> dict[str, str]:
    """The tightest limited budget right after the hold, as the reserve saw it.

    No extra ledger read: a backend that does not report ``Hold.remaining`` gets no
    headers (ties go to the first scope in sorted order).
    """
    limited = [(left, scope) for scope, left in hold.remaining if left is not None]
    if not limited:
        return {}
    remaining, scope = min(limited)
    return {
        REMAINING_HEADER: str(remaining),
        "x-gatewaykit-budget-scope": scope,
    }


def _budget_rejection(exc: BudgetExceeded) -> RequestRejected:
    details: dict[str, object] = {
        "scope": exc.scope,
        "limit": str(exc.limit),
        "spent": str(exc.spent),
        "held": str(exc.held),
        "remaining": str(exc.remaining),
        "requested": str(exc.requested),
        "resets_at": exc.resets_at.isoformat() if exc.resets_at else None,
    }
    message = (
        f"budget exceeded for {exc.scope}: ${exc.remaining} of ${exc.limit} remaining, "
        f"this request needs up to ${exc.requested}"
    )
    if exc.resets_at is not None:
        message += f"; the budget resets at {exc.resets_at.isoformat()}"
    return RequestRejected(ErrorKind.BUDGET, message, details=details)
