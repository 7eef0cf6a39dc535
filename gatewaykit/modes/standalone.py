"""StandaloneMode: keys, budgets and usage in a local ledger; upstreams from configuration.

``resolve`` admits a request in the order that gives the precedence of docs/errors.md
(401 > 400 > 403 > 429 > 404 > 402):

1. credential (``Authorization: Bearer`` or ``x-api-key``) → 401 when missing, unknown,
   revoked or expired;
2. a master key must name the user (body ``user`` / Anthropic ``metadata.user_id``) → 400;
   an unpriced model under the ``reject`` policy → 400;
3. an ordinary key naming another user, or a model outside the key's ``allowed_models``
   → 403;
4. the rate limits of the key, the user and the team (requests and tokens per minute;
   :mod:`gatewaykit.ratelimit`) → 429 with ``Retry-After`` and OpenAI's
   ``x-ratelimit-*`` headers;
5. no upstream serves the model → 404 (every upstream that does becomes an attempt, in
   configuration order: the adapters fall back to the next one before the first chunk);
6. one atomic hold of the estimate on every scope that applies (``key:<key_id>``,
   ``user:<user>``, ``team:<team>``) → 402 with the refusing budget's numbers, or 503 when
   the ledger is unreachable.

An OpenAI responses request that continues a stored response or conversation also holds
the stored context it will be billed for, as remembered in the ledger for this user (an
unknown one: the model's context window; or 400 under ``unknown_response_context=
"reject"`` or without a context window — a 400, so it is decided with the other 400s);
its settlement remembers the new context (:mod:`gatewaykit.stored_context`).

The request id is the hold id. :class:`StandaloneSettlement` settles that hold and writes
the usage record in the same ledger call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Literal

from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import (
    BudgetExceeded,
    ConcurrencyExceeded,
    ConfigurationError,
    ErrorKind,
    LedgerUnavailableError,
    RequestRejected,
)
from gatewaykit.keys import hash_key
from gatewaykit.ledger.base import (
    RESPONSE_CONTEXT_TTL,
    ApiKeyRecord,
    Hold,
    Ledger,
    validate_ttl,
)
from gatewaykit.listing import ListedModel
from gatewaykit.modes.admission import (
    PROVIDERS,
    credential,
    endpoint_name,
    estimate,
    missing_credential,
)
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.charging import DisconnectPolicy, MissingUsagePolicy
from gatewaykit.modes.fitting import (
    FITTED_FORMATS,
    MAX_OUTPUT_TOKENS_HEADER,
    least_fitted_tokens,
    output_fit,
    with_output_limit,
)
from gatewaykit.modes.standalone_settlement import REMAINING_HEADER, StandaloneSettlement
from gatewaykit.money import parse_usd
from gatewaykit.pricing import ModelPrice, PriceTable
from gatewaykit.ratelimit import InProcessRateLimiter, RateLimit, RateLimiter
from gatewaykit.settlement import (
    RequestEstimate,
    UnmeteredSettlement,
)
from gatewaykit.stored_context import (
    ContextPlan,
    UnknownContextPolicy,
    continuation_hold_tokens,
    read_continuation,
)
from gatewaykit.upstream import Attempt, Upstream

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
#: A request whose worst case does not fit its budgets: ``"refuse"`` it (402), or ``"fit"``
#: a smaller output cap into what is left (:mod:`gatewaykit.modes.fitting`).
OverBudgetPolicy = Literal["refuse", "fit"]
#: ``"reject"`` (400), ``"allow"`` (served unbudgeted: held and charged 0), or a fallback
#: price: a :class:`ModelPrice`, or a ``Decimal`` USD per million tokens for input and
#: output alike.
UnpricedPolicy = Literal["reject", "allow"] | ModelPrice | Decimal

_KEY_CACHE_SIZE = 10_000
_USER = re.compile(r"[^\s]{1,200}")  # what a budget scope id allows
#: Pauses between attempts to settle while the ledger is unreachable (about 1.3 s in all).


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
        if isinstance(upstreams, Upstream) or not all(isinstance(u, Upstream) for u in upstreams):
            raise ConfigurationError("upstreams must be a sequence of Upstream")
        if missing_usage not in ("estimate", "hold", "allow_free", "fail"):
            raise ConfigurationError(
                f"missing_usage must be estimate, hold, allow_free or fail, not {missing_usage!r}"
            )
        if disconnect not in ("charge_observed", "release"):
            raise ConfigurationError(
                f"disconnect must be charge_observed or release, not {disconnect!r}"
            )
        if isinstance(default_max_output_tokens, bool) or not isinstance(
            default_max_output_tokens, int
        ):
            raise ConfigurationError("default_max_output_tokens must be an int")
        if default_max_output_tokens < 0:
            raise ConfigurationError("default_max_output_tokens must not be negative")
        if not key_cache_ttl >= 0:
            raise ConfigurationError("key_cache_ttl must be ≥ 0 seconds")
        if default_rpm is not None and (isinstance(default_rpm, bool) or default_rpm < 1):
            raise ConfigurationError("default_rpm must be a positive int or None")
        if default_tpm is not None and (isinstance(default_tpm, bool) or default_tpm < 1):
            raise ConfigurationError("default_tpm must be a positive int or None")
        for limit in rate_limits:
            if not isinstance(limit, RateLimit) or not limit.scope.startswith(("user:", "team:")):
                raise ConfigurationError(
                    f"rate_limits takes RateLimit objects on user: or team: scopes, not {limit!r}"
                )
        if rate_limiter is not None and not isinstance(rate_limiter, RateLimiter):
            raise ConfigurationError("rate_limiter must implement gatewaykit.ratelimit.RateLimiter")
        if user_max_concurrent is not None and (
            isinstance(user_max_concurrent, bool)
            or not isinstance(user_max_concurrent, int)
            or user_max_concurrent < 1
        ):
            raise ConfigurationError("user_max_concurrent must be a positive int or None")
        if ledger_unavailable not in ("fail_closed", "fail_open"):
            raise ConfigurationError(
                f"ledger_unavailable must be fail_closed or fail_open, not {ledger_unavailable!r}"
            )
        if over_budget not in ("refuse", "fit"):
            raise ConfigurationError(f"over_budget must be refuse or fit, not {over_budget!r}")
        if (
            isinstance(min_output_tokens, bool)
            or not isinstance(min_output_tokens, int)
            or min_output_tokens < 1
        ):
            raise ConfigurationError("min_output_tokens must be a positive int")
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
        if master_key is not None and len(master_key) < 16:
            raise ConfigurationError("master_key must be at least 16 characters")
        self.ledger = ledger
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self.upstreams = tuple(upstreams)
        self.unpriced_price = _unpriced_price(unpriced)
        self.unpriced: Literal["reject", "allow", "fallback"] = (
            "reject" if unpriced == "reject" else "allow" if unpriced == "allow" else "fallback"
        )
        self.missing_usage: MissingUsagePolicy = missing_usage
        self.disconnect: DisconnectPolicy = disconnect
        self.hold_ttl = validate_ttl(hold_ttl)
        self.default_max_output_tokens = default_max_output_tokens
        self.key_cache_ttl = float(key_cache_ttl)
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.rate_limits = {limit.scope: limit for limit in rate_limits}
        self._any_scope_limit = bool(self.rate_limits)
        self.rate_limiter: RateLimiter = rate_limiter or InProcessRateLimiter(clock=clock)
        self.user_max_concurrent = user_max_concurrent
        self.teams = dict(teams or {})
        self.budget_headers = budget_headers
        self.ledger_unavailable: LedgerUnavailablePolicy = ledger_unavailable
        self.over_budget: OverBudgetPolicy = over_budget
        self.min_output_tokens = min_output_tokens
        self.unknown_response_context: UnknownContextPolicy = unknown_response_context
        self.response_context_ttl = validate_ttl(response_context_ttl)
        self._master_hash = hash_key(master_key) if master_key is not None else None
        self._clock = clock
        # Wall time (key expiry) is read from the same clock, so one fake clock moves
        # everything in tests.
        self._wall_epoch = time.time() - clock()
        #: digest -> (record or None, expiry, the ledger's key_epoch when it was looked up)
        self._keys: OrderedDict[str, tuple[ApiKeyRecord | None, float, int | None]] = OrderedDict()
        self._key_limits: dict[str, RateLimit] = {}
        self._routes: dict[
            tuple[WireFormat | None, str], tuple[tuple[Attempt, ...], ModelPrice | None]
        ] = {}

    def __repr__(self) -> str:
        return (
            f"StandaloneMode(ledger={type(self.ledger).__name__}, upstreams={len(self.upstreams)}, "
            f"prices={len(self.prices)}, master_key={'set' if self._master_hash else 'unset'})"
        )

    # -- keys ------------------------------------------------------------------------
    async def revoke_key(self, key_id: str) -> bool:
        """Revoke a key in the ledger and forget it in this process's cache at once."""
        revoked = await self.ledger.revoke_key(key_id)
        self.invalidate_key(key_id)
        return revoked

    def _wall_time(self) -> float:
        return self._wall_epoch + self._clock()

    def invalidate_key(self, key_id: str | None = None) -> None:
        """Drop cached lookups of ``key_id`` (or of every key, and every cached miss)."""
        if key_id is None:
            self._keys.clear()
            return
        for digest in [d for d, (rec, *_) in self._keys.items() if rec and rec.key_id == key_id]:
            del self._keys[digest]

    async def _find_key(self, digest: str) -> ApiKeyRecord | None:
        now = self._clock()
        # A ledger that tells when keys changed (key_epoch) ends the cache at once;
        # others rely on key_cache_ttl alone. Read before the lookup: a change landing
        # during it leaves the entry tagged stale.
        epoch: int | None = getattr(self.ledger, "key_epoch", None)
        cached = self._keys.get(digest)
        if cached is not None and cached[1] > now and cached[2] == epoch:
            self._keys.move_to_end(digest)
            return cached[0]
        try:
            record = await self.ledger.find_key(digest)
        except LedgerUnavailableError:
            if self.ledger_unavailable == "fail_open" and cached is not None and cached[0]:
                return cached[0]  # a key seen recently; never admit an unknown key
            raise
        if self.key_cache_ttl > 0:
            self._keys[digest] = (record, now + self.key_cache_ttl, epoch)
            self._keys.move_to_end(digest)
            while len(self._keys) > _KEY_CACHE_SIZE:
                self._keys.popitem(last=False)
        return record

    async def authenticate(self, headers: Mapping[str, str]) -> ApiKeyRecord | None:
        """The key record the request's credential names, None for the master key; else 401."""
        presented = credential(headers)
        if presented is None:
            raise missing_credential()
        digest = hash_key(presented)
        if self._master_hash is not None and hmac.compare_digest(digest, self._master_hash):
            return None
        record = await self._find_key(digest)
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise RequestRejected(ErrorKind.AUTHENTICATION, "invalid API key")
        if record.revoked:
            raise RequestRejected(ErrorKind.AUTHENTICATION, "this API key has been revoked")
        if record.expires_at is not None and record.expires_at.timestamp() <= self._wall_time():
            raise RequestRejected(ErrorKind.AUTHENTICATION, "this API key has expired")
        return record

    # -- admission -------------------------------------------------------------------
    async def resolve(self, request: GatewayRequest) -> GatewayContext:
        identity = await self.authenticate(request.headers)
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
            attempts, price = self._route(fmt, request.parsed.model)
            assert user is not None  # a metered master-key request names its user
            context_plan, context_tokens = await self._stored_context(request, user, price)
        else:  # nothing is charged, so no price is needed
            attempts = self._attempts(fmt, request.parsed.model)

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
        limits = self._rate_limits(identity, user, team)
        token_limits: tuple[RateLimit, ...] = ()
        if limits:
            tokens = (
                held_estimate.prompt_tokens + held_estimate.max_output_tokens
                if held_estimate is not None
                else 0  # unmetered: counted as a request, never as tokens
            )
            decision = await self.rate_limiter.acquire(request.request_id, limits, tokens)
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
                return await self._hold(
                    request, identity, held_estimate, price, attempts, user, key_id, team,
                    context_plan, headers, token_limits,
                )  # fmt: skip
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

    def _rate_limits(
        self, identity: ApiKeyRecord | None, user: str | None, team: str | None
    ) -> tuple[RateLimit, ...]:
        """The limits that apply to a request: its key's, its user's, its team's."""
        limits: tuple[RateLimit, ...] = ()
        if identity is not None:
            rpm = identity.rpm if identity.rpm is not None else self.default_rpm
            tpm = identity.tpm if identity.tpm is not None else self.default_tpm
            if rpm is not None or tpm is not None:
                limit = self._key_limits.get(identity.key_id)
                if limit is None or limit.rpm != rpm or limit.tpm != tpm:
                    if len(self._key_limits) >= _KEY_CACHE_SIZE:
                        self._key_limits.clear()
                    limit = RateLimit(f"key:{identity.key_id}", rpm=rpm, tpm=tpm)
                    self._key_limits[identity.key_id] = limit
                limits = (limit,)
        if self._any_scope_limit:
            scopes = ([f"user:{user}"] if user else []) + ([f"team:{team}"] if team else [])
            for scope in scopes:
                limit = self.rate_limits.get(scope)
                if limit is None:
                    every = self.rate_limits.get(scope.split(":", 1)[0] + ":*")
                    if every is not None:
                        limit = RateLimit(scope, rpm=every.rpm, tpm=every.tpm)
                if limit is not None:
                    limits += (limit,)
        return limits

    async def _hold(
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
            if self.ledger_unavailable != "fail_open":
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
        upstreams = [u for u in self.upstreams if u.provider == provider]
        candidates = dict.fromkeys(self.prices)
        for upstream in upstreams:
            candidates.update(dict.fromkeys(sorted(upstream.models or ())))
        candidates.update(dict.fromkeys(sorted(allowed or ())))
        listed = []
        for model in candidates:
            if allowed is not None and model not in allowed:
                continue
            serving = next((u for u in upstreams if u.serves(model)), None)
            if serving is None:
                continue
            if self.unpriced == "reject" and self.prices.lookup(model, provider) is None:
                continue
            listed.append(ListedModel(id=model, owned_by=serving.label))
        return listed

    def _attempts(self, fmt: WireFormat | None, model: str) -> tuple[Attempt, ...]:
        return tuple(
            Attempt(attempt_id=str(n), upstream=u, model=model)
            for n, u in enumerate(self._upstreams(fmt, model), start=1)
        )

    def _route(
        self, fmt: WireFormat | None, model: str
    ) -> tuple[tuple[Attempt, ...], ModelPrice | None]:
        """The attempts (every configured upstream that serves ``model`` in ``fmt``, in
        order: the adapters fall back along them) and the price; remembered per model,
        since both follow from configuration alone."""
        key = (fmt, model)
        route = self._routes.get(key)
        if route is None:
            serving = self._upstreams(fmt, model)
            price = self._price(model, serving[0] if serving else None)
            attempts = tuple(
                Attempt(attempt_id=str(n), upstream=u, model=model)
                for n, u in enumerate(serving, start=1)
            )
            if len(self._routes) >= _KEY_CACHE_SIZE:
                self._routes.clear()
            route = self._routes[key] = (attempts, price)
        return route

    def _upstreams(self, fmt: WireFormat | None, model: str) -> list[Upstream]:
        """The configured upstreams that serve ``model`` in ``fmt``, in order (fallbacks)."""
        provider = PROVIDERS.get(fmt) if fmt is not None else None
        return [
            upstream
            for upstream in self.upstreams
            if (provider is None or upstream.provider == provider) and upstream.serves(model)
        ]

    def _price(self, model: str, upstream: Upstream | None) -> ModelPrice | None:
        """The price to hold and charge at; None means unbudgeted (``allow``)."""
        price = self.prices.lookup(model, upstream.provider if upstream else None)
        if price is not None:
            return price
        if self.unpriced == "reject":
            raise RequestRejected(
                ErrorKind.NOT_PRICED,
                f"model {model!r} has no price configured on this gateway",
            )
        return self.unpriced_price


def _unpriced_price(policy: object) -> ModelPrice | None:
    if policy in ("reject", "allow"):
        return None
    if isinstance(policy, ModelPrice):
        return policy
    if isinstance(policy, Decimal):
        rate = parse_usd(policy)
        return ModelPrice(input_per_mtok=rate, output_per_mtok=rate)
    raise ConfigurationError(
        "unpriced must be 'reject', 'allow', a ModelPrice or a Decimal USD per million tokens, "
        f"not {policy!r}"
    )


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
