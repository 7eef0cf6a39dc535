"""StandaloneMode: keys, budgets and usage in a local ledger; upstreams from configuration.

``resolve`` admits a request in the order that gives the precedence of docs/errors.md
(401 > 400 > 403 > 429 > 404 > 402):

1. credential (``Authorization: Bearer`` or ``x-api-key``) → 401 when missing, unknown,
   revoked or expired (:mod:`gatewaykit.modes.authentication`);
2. a master key must name the user (body ``user`` / Anthropic ``metadata.user_id``) → 400;
   an unpriced model under the ``reject`` policy → 400;
3. an ordinary key naming another user, or a model outside the key's ``allowed_models``
   → 403;
4. the rate limits of the key, the user and the team (requests and tokens per minute;
   :mod:`gatewaykit.ratelimit.selection`) → 429 with ``Retry-After`` and OpenAI's
   ``x-ratelimit-*`` headers;
5. no upstream serves the model → 404 (every upstream that does becomes an attempt, in
   configuration order: the adapters fall back to the next one before the first chunk;
   :mod:`gatewaykit.modes.routing`);
6. one atomic hold of the estimate on every scope that applies (``key:<key_id>``,
   ``user:<user>``, ``team:<team>``) → 402 with the refusing budget's numbers, or 503 when
   the ledger is unreachable (:mod:`gatewaykit.modes.holds`).

An OpenAI responses request that continues a stored response or conversation also holds
the stored context it will be billed for, as remembered in the ledger for this user (an
unknown one: the model's context window; or 400 under ``unknown_response_context=
"reject"`` or without a context window — a 400, so it is decided with the other 400s);
its settlement remembers the new context (:mod:`gatewaykit.stored_context`).

The request id is the hold id. :class:`StandaloneSettlement` settles that hold and writes
the usage record in the same ledger call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError, ErrorKind, LedgerUnavailableError, RequestRejected
from gatewaykit.ledger.base import RESPONSE_CONTEXT_TTL, ApiKeyRecord, Ledger, validate_ttl
from gatewaykit.listing import ListedModel
from gatewaykit.modes.admission import check_default_max_output_tokens, estimate
from gatewaykit.modes.authentication import KeyAuthenticator
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.charging import DisconnectPolicy, MissingUsagePolicy
from gatewaykit.modes.holds import BudgetHolder, OverBudgetPolicy
from gatewaykit.modes.routing import RouteTable, UnpricedPolicy
from gatewaykit.modes.standalone_settlement import StandaloneSettlement
from gatewaykit.pricing import ModelPrice, PriceTable
from gatewaykit.ratelimit import InProcessRateLimiter, RateLimit, RateLimiter
from gatewaykit.ratelimit.selection import LimitSelector
from gatewaykit.settlement import UnmeteredSettlement
from gatewaykit.stored_context import (
    ContextPlan,
    UnknownContextPolicy,
    continuation_hold_tokens,
    read_continuation,
)
from gatewaykit.upstream import Upstream

__all__ = [
    "DisconnectPolicy",
    "LedgerUnavailablePolicy",
    "MissingUsagePolicy",
    "OverBudgetPolicy",
    "StandaloneMode",
    "StandaloneSettlement",
    "UnknownContextPolicy",
    "UnpricedPolicy",
]

logger = logging.getLogger("gatewaykit.standalone")

LedgerUnavailablePolicy = Literal["fail_closed", "fail_open"]

_USER = re.compile(r"[^\s]{1,200}")  # what a budget scope id allows


class StandaloneMode:
    """Admit requests against a local :class:`~gatewaykit.ledger.base.Ledger`.

    See the module docstring for the admission order, and docs/configuration.md for every
    option. ``teams`` maps a user to a team for requests whose key names no team (and for
    master-key requests); a key's own ``team`` wins.

    Rate limits: a key's own ``rpm``/``tpm``, else ``default_rpm``/``default_tpm``;
    ``rate_limits`` adds limits on ``user:<name>`` and ``team:<name>`` scopes (``user:*``
    and ``team:*``: every user or team, each counted on its own). The master key has no
    key limits; its user's and team's apply. ``rate_limiter`` counts them (default: an
    :class:`~gatewaykit.ratelimit.InProcessRateLimiter`, per process). A key's
    ``max_concurrent`` and ``user_max_concurrent`` (every user's cap, master-key requests
    included) cap the requests in flight, inside the ledger's reserve (429).
    """

    @property
    def cancel_safe(self) -> bool:
        """``resolve`` undoes a cancelled admission itself — the hold is released, a token
        estimate returned to the limiter — on a ledger whose operations survive a plain
        ``task.cancel()`` of their caller (``SQLiteLedger.cancel_safe``); GatewayMiddleware
        then awaits it without a shielding task."""
        return getattr(self.ledger, "cancel_safe", False) is True

    def __init__(
        self,
        ledger: Ledger,
        *,
        prices: PriceTable | Mapping[str, ModelPrice],
        upstreams: Sequence[Upstream],
        master_key: str | None = None,
        unpriced: UnpricedPolicy = "reject",
        missing_usage: MissingUsagePolicy = "estimate",
        disconnect: DisconnectPolicy = "charge_observed",
        hold_ttl: float = 600,
        default_max_output_tokens: int = 4096,
        key_cache_ttl: float = 5.0,
        default_rpm: int | None = None,
        default_tpm: int | None = None,
        rate_limits: Sequence[RateLimit] = (),
        rate_limiter: RateLimiter | None = None,
        user_max_concurrent: int | None = None,
        teams: Mapping[str, str] | None = None,
        budget_headers: bool = True,
        ledger_unavailable: LedgerUnavailablePolicy = "fail_closed",
        over_budget: OverBudgetPolicy = "refuse",
        min_output_tokens: int = 256,
        unknown_response_context: UnknownContextPolicy = "context_window",
        response_context_ttl: float = RESPONSE_CONTEXT_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(ledger, Ledger):
            raise ConfigurationError("ledger must implement gatewaykit.ledger.Ledger")
        self._routes = RouteTable(prices=prices, upstreams=upstreams, unpriced=unpriced)
        if ledger_unavailable not in ("fail_closed", "fail_open"):
            raise ConfigurationError(
                f"ledger_unavailable must be fail_closed or fail_open, not {ledger_unavailable!r}"
            )
        if unknown_response_context not in ("context_window", "reject"):
            raise ConfigurationError(
                "unknown_response_context must be context_window or reject, not "
                f"{unknown_response_context!r}"
            )
        for user, team in (teams or {}).items():
            if not _USER.fullmatch(str(user)) or not _USER.fullmatch(str(team)):
                raise ConfigurationError(
                    f"teams: {user!r} → {team!r}: names must be 1 to 200 characters without "
                    "whitespace"
                )
        if rate_limiter is not None and not isinstance(rate_limiter, RateLimiter):
            raise ConfigurationError("rate_limiter must implement gatewaykit.ratelimit.RateLimiter")
        fail_open = ledger_unavailable == "fail_open"
        self._keys = KeyAuthenticator(
            ledger, master_key=master_key, cache_ttl=key_cache_ttl, fail_open=fail_open, clock=clock
        )
        self._limits = LimitSelector(
            default_rpm=default_rpm, default_tpm=default_tpm, rate_limits=rate_limits
        )
        self.rate_limiter: RateLimiter = rate_limiter or InProcessRateLimiter(clock=clock)
        self._holds = BudgetHolder(
            ledger,
            hold_ttl=hold_ttl,
            missing_usage=missing_usage,
            disconnect=disconnect,
            over_budget=over_budget,
            min_output_tokens=min_output_tokens,
            user_max_concurrent=user_max_concurrent,
            budget_headers=budget_headers,
            fail_open=fail_open,
            rate_limiter=self.rate_limiter,
            clock=clock,
        )
        self.ledger = ledger
        self.default_max_output_tokens = check_default_max_output_tokens(default_max_output_tokens)
        self.teams = dict(teams or {})
        self.ledger_unavailable: LedgerUnavailablePolicy = ledger_unavailable
        self.unknown_response_context: UnknownContextPolicy = unknown_response_context
        self.response_context_ttl = validate_ttl(response_context_ttl)
        # The configuration, readable on the mode as before. The parts above hold what they
        # use: assigning to these afterwards does not reconfigure them.
        self.prices, self.upstreams = self._routes.prices, self._routes.upstreams
        self.unpriced, self.unpriced_price = self._routes.unpriced, self._routes.unpriced_price
        self.key_cache_ttl = self._keys.cache_ttl
        self.default_rpm, self.default_tpm = default_rpm, default_tpm
        self.rate_limits = self._limits.rate_limits
        self.missing_usage: MissingUsagePolicy = missing_usage
        self.disconnect: DisconnectPolicy = disconnect
        self.hold_ttl = self._holds.hold_ttl
        self.over_budget: OverBudgetPolicy = over_budget
        self.min_output_tokens = min_output_tokens
        self.user_max_concurrent = user_max_concurrent
        self.budget_headers = budget_headers

    def __repr__(self) -> str:
        return (
            f"StandaloneMode(ledger={type(self.ledger).__name__}, upstreams={len(self.upstreams)}, "
            f"prices={len(self.prices)}, master_key={'set' if self._keys.master_hash else 'unset'})"
        )

    # -- keys ------------------------------------------------------------------------
    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key in the ledger and forget it in this process's cache at once."""
        revoked = await self.ledger.revoke_key(key_id)
        self.invalidate_key(key_id)
        return revoked

    def invalidate_key(self, key_id: str | None = None) -> None:
        """Drop cached lookups of ``key_id`` (or of every key, and every cached miss)."""
        self._keys.invalidate(key_id)

    async def authenticate(self, headers: Mapping[str, str]) -> ApiKeyRecord | None:
        """The key record the request's credential names, None for the master key; else 401."""
        return await self._keys.authenticate(headers)

    # -- admission -------------------------------------------------------------------
    async def resolve(self, request: GatewayRequest) -> GatewayContext:
        identity = await self._keys.authenticate(request.headers)
        fmt = request.format
        metered = request.parsed.metered
        user_field = "metadata.user_id" if fmt is WireFormat.ANTHROPIC_MESSAGES else "user"
        user: str | None
        if identity is None:  # the master key
            user = request.parsed.user
            if user is None:
                if metered:  # someone must pay: the master key names who
                    raise RequestRejected(
                        ErrorKind.INVALID_REQUEST,
                        f"requests made with the master key must name the user in '{user_field}'",
                    )
            elif not _USER.fullmatch(user):
                raise RequestRejected(
                    ErrorKind.INVALID_REQUEST,
                    f"'{user_field}' must be 1 to 200 characters without whitespace",
                )
            key_id, team = None, self.teams.get(user) if user else None
        else:
            user, key_id = identity.user, identity.key_id
            team = identity.team or self.teams.get(user)

        if metered:
            attempts, price = self._routes.route(fmt, request.parsed.model)
            assert user is not None  # a metered master-key request names its user
            context_plan, context_tokens = await self._stored_context(request, user, price)
        else:  # nothing is charged, so no price is needed
            attempts = self._routes.attempts(fmt, request.parsed.model)

        if isinstance(identity, ApiKeyRecord):
            if request.parsed.user is not None and request.parsed.user != identity.user:
                raise RequestRejected(
                    ErrorKind.PERMISSION,
                    f"'{user_field}' does not match the user of this API key",
                )
            if (
                identity.allowed_models is not None
                and request.parsed.model not in identity.allowed_models
            ):
                raise RequestRejected(
                    ErrorKind.PERMISSION, f"this API key may not use model {request.parsed.model!r}"
                )
        held_estimate = (
            estimate(
                request,
                price,
                default_max_output_tokens=self.default_max_output_tokens,
                extra_prompt_tokens=context_tokens,
            )
            if metered
            else None
        )
        headers: dict[str, str] = {}
        limits = self._limits.limits(identity, user, team)
        token_limits: tuple[RateLimit, ...] = ()
        if limits:
            tokens = (
                held_estimate.prompt_tokens + held_estimate.max_output_tokens
                if held_estimate is not None
                else 0  # unmetered: counted as a request, never as tokens
            )
            try:
                decision = await self.rate_limiter.acquire(request.request_id, limits, tokens)
            except asyncio.CancelledError:  # the estimate may be counted already
                self._holds.return_tokens(request.request_id, limits)
                raise
            headers.update(decision.headers)
            if not decision.allowed:
                raise RequestRejected(
                    ErrorKind.RATE_LIMIT,
                    f"{decision.reason}; retry after {decision.headers['retry-after']}s",
                    headers=decision.headers,
                )
            if decision.tokens is not None and held_estimate is not None:
                token_limits = limits  # some limit counts tokens: settle them
        try:
            if not attempts:
                raise RequestRejected(
                    ErrorKind.NOT_FOUND, f"no upstream serves model {request.parsed.model!r}"
                )
            if held_estimate is not None:
                assert user is not None  # a metered master-key request names its user
                return await self._holds.hold(
                    request, identity, held_estimate, price, attempts, user, key_id, team,
                    context_plan, headers, token_limits,
                )  # fmt: skip
        except asyncio.CancelledError:
            if token_limits:  # cancelled: no await may run here, so in the background
                self._holds.return_tokens(request.request_id, token_limits)
            raise
        except BaseException:
            if token_limits:  # admitted by the limiter, refused here: no tokens were used
                with contextlib.suppress(Exception):  # the refusal matters, not the count
                    await self.rate_limiter.settle(request.request_id, token_limits, 0)
            raise
        return GatewayContext(  # unmetered: nothing to hold or charge
            request_id=request.request_id,
            settlement=UnmeteredSettlement(request_id=request.request_id),
            format=fmt,
            model=request.parsed.model,
            stream=request.parsed.stream,
            body=request.body,
            raw_body=request.raw_body,
            attempts=attempts,
            user_id=user,
            key_id=key_id,
            response_headers=headers,
        )

    async def _stored_context(
        self, request: GatewayRequest, user: str, price: ModelPrice | None
    ) -> tuple[ContextPlan | None, int]:
        """For an OpenAI responses request: how its context is to be remembered, and the
        prompt tokens to hold for the stored context it continues (0 if none).

        The lookup is by ``user:<user>``: another user's response or conversation id is
        unknown here, exactly like an id the gateway never saw.
        """
        if request.format is not WireFormat.OPENAI_RESPONSES:
            return None, 0
        continuation = read_continuation(request.body)
        plan = ContextPlan(
            owner=f"user:{user}",
            continuation=continuation,
            ttl=self.response_context_ttl,
            store=request.body.get("store") is not False,
        )
        if not continuation:
            return plan, 0
        known: dict[str, int | None] = {}
        try:
            for context_id in continuation.ids:
                known[context_id] = await self.ledger.response_context(context_id, plan.owner)
        except LedgerUnavailableError:
            if self.ledger_unavailable != "fail_open":
                raise
            # Admitted without the ledger: the ids count as unknown, never refused for it.
            window = price.context_window if price is not None else None
            return dataclasses.replace(plan, known=dict.fromkeys(continuation.ids)), window or 0
        plan = dataclasses.replace(plan, known=known)
        if price is None:  # unbudgeted: nothing to hold, but the reject policy still applies
            if self.unknown_response_context == "reject":
                continuation_hold_tokens(continuation, known, context_window=None, policy="reject")
            return plan, 0
        tokens = continuation_hold_tokens(
            continuation,
            known,
            context_window=price.context_window,
            policy=self.unknown_response_context,
            model=request.parsed.model,
        )
        return plan, tokens

    async def list_models(
        self, headers: Mapping[str, str], *, provider: Literal["openai", "anthropic"]
    ) -> list[ListedModel]:
        """The models the credential in ``headers`` may use through ``provider``'s
        upstreams: those a request would be admitted for (allowed for the key, priced or
        allowed unpriced, served by an upstream), in price-table order. An upstream
        without ``models`` serves any name, so the candidates are the priced models, the
        upstreams' own ``models`` and the key's ``allowed_models``."""
        identity = await self.authenticate(headers)
        allowed = identity.allowed_models if identity is not None else None
        return self._routes.listed_models(provider, allowed)
