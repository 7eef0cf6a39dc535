"""The one exception tree of gatewaykit.

```
GatewayKitError
├── ConfigurationError (ValueError)   bad configuration or argument, raised where it was given
│   ├── InvalidAmountError            negative, NaN, infinite or float money
│   ├── InvalidScopeError             a budget scope that is not ``kind:id``
│   └── InvalidLedgerURLError         an ``open_ledger`` URL it cannot open
├── LedgerError                       the budget store refused or failed
│   ├── BudgetExceeded                a reserve would pass a budget's limit
│   ├── HoldConflictError             a hold id replayed with other parameters
│   ├── HoldNotFoundError             an operation on a hold id the store never saw
│   ├── HoldClosedError               extend of a hold that is no longer live
│   ├── LedgerUnavailableError        the store cannot be reached (→ 503)
│   └── SchemaError                   a database of an unknown version or not ours
├── SettlementMissingError (LookupError)  get_settlement() without GatewayMiddleware
├── MalformedStreamError (ValueError) an upstream stream or body the gateway cannot read
├── UpstreamError                     the upstream HTTP exchange failed (any client)
│   ├── UpstreamConnectError          no connection could be made (in time, or at all)
│   ├── UpstreamTimeoutError          the answer stopped coming (read timeout)
│   └── UpstreamResponseTooLarge      a body over the gateway's cap
└── RequestRejected                   a request refused on the wire (status + error kind)
```

``RequestRejected`` carries everything needed to render the error in the endpoint's own
envelope (see :mod:`gatewaykit.envelopes`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal

__all__ = [
    "BudgetExceeded",
    "ConcurrencyExceeded",
    "ConfigurationError",
    "ErrorKind",
    "GatewayKitError",
    "HoldClosedError",
    "HoldConflictError",
    "HoldNotFoundError",
    "InvalidAmountError",
    "InvalidLedgerURLError",
    "InvalidScopeError",
    "LedgerError",
    "LedgerUnavailableError",
    "MalformedStreamError",
    "RequestRejected",
    "SchemaError",
    "SettlementMissingError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamResponseTooLarge",
    "UpstreamTimeoutError",
    "describe_error",
]


class GatewayKitError(Exception):
    """Root of every error gatewaykit raises on purpose."""


class ConfigurationError(GatewayKitError, ValueError):
    """A configuration value or argument is invalid; the message says how to fix it."""


class InvalidAmountError(ConfigurationError):
    """Money must be a finite, non-negative ``Decimal``, ``int`` or decimal string."""


class InvalidScopeError(ConfigurationError):
    """A budget scope must look like ``kind:id`` (for example ``user:alice``)."""


class InvalidLedgerURLError(ConfigurationError):
    """``open_ledger`` was given a URL it does not understand."""


class LedgerError(GatewayKitError):
    """The budget ledger refused an operation or could not perform it."""


class BudgetExceeded(LedgerError):
    """A reserve would take a budget past its limit; nothing was held on any scope."""

    def __init__(
        self,
        *,
        scope: str,
        limit: Decimal,
        spent: Decimal,
        held: Decimal,
        requested: Decimal,
        resets_at: datetime | None,
    ) -> None:
        self.scope = scope
        self.limit = limit
        self.spent = spent
        self.held = held
        self.requested = requested
        self.resets_at = resets_at
        super().__init__(
            f"budget {scope} exceeded: limit ${limit}, spent ${spent}, held ${held}, "
            f"remaining ${self.remaining}, requested ${requested}"
            + (f", resets at {resets_at.isoformat()}" if resets_at else "")
        )

    @property
    def remaining(self) -> Decimal:
        """What is left in the window: ``limit - spent - held``, as ``budgets show`` says it.

        Negative after an overrun (the provider billed more than was held): shown as what
        it is, never clamped, so the 402 and the ledger agree.
        """
        return self.limit - self.spent - self.held


class ConcurrencyExceeded(LedgerError):
    """A reserve would give a scope more live holds (requests in flight) than its cap."""

    def __init__(self, *, scope: str, limit: int, live: int) -> None:
        self.scope = scope
        self.limit = limit
        self.live = live
        super().__init__(f"{scope} already has {live} requests in flight, its limit is {limit}")


class HoldConflictError(LedgerError):
    """The hold id was already used with different parameters; use a fresh id."""


class HoldNotFoundError(LedgerError):
    """The ledger has no hold with this id."""


class HoldClosedError(LedgerError):
    """The hold is no longer live (settled, released or expired), so it cannot be extended."""


class LedgerUnavailableError(LedgerError):
    """The budget store cannot be reached or failed; requests fail closed by default."""


class SchemaError(LedgerError):
    """The database is not a gatewaykit database, or was written by an unknown version."""


class SettlementMissingError(GatewayKitError, LookupError):
    """``get_settlement`` was called on a request that GatewayMiddleware did not handle."""


class MalformedStreamError(GatewayKitError, ValueError):
    """The upstream sent a stream (or body) the gateway cannot read: bad framing or JSON."""


class UpstreamError(GatewayKitError):
    """The exchange with an upstream failed in transport (reset, refused, broken framing).

    Raised by every :class:`~gatewaykit.http.UpstreamClient` in place of its HTTP
    library's own exceptions. The message is the gateway's own words and ``cause`` the
    name of the library's exception class, never that exception's text: transport errors
    quote request headers, and the gateway's provider key is one of them.
    """

    def __init__(self, message: str, *, cause: str = "") -> None:
        self.cause = cause
        super().__init__(f"{message} ({cause})" if cause else message)


class UpstreamConnectError(UpstreamError):
    """No connection to the upstream could be made: refused, DNS, TLS, or none in time
    (connect timeout, or no free connection in the pool in time). The request never left."""


class UpstreamTimeoutError(UpstreamError, TimeoutError):
    """The request was sent but the answer stopped coming (read timeout)."""


class UpstreamResponseTooLarge(UpstreamError):
    """An upstream body passed the size the gateway is willing to hold in memory."""


class ErrorKind(enum.Enum):
    """What went wrong, independent of the wire format; maps to status and envelope type."""

    AUTHENTICATION = "authentication"
    PERMISSION = "permission"
    BUDGET = "budget"
    RATE_LIMIT = "rate_limit"
    INVALID_REQUEST = "invalid_request"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    NOT_PRICED = "not_priced"
    UNAVAILABLE = "unavailable"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_AUTH = "upstream_auth"

    @property
    def status(self) -> int:
        """The HTTP status this kind of error is answered with."""
        return _STATUS[self]


_STATUS = {
    ErrorKind.AUTHENTICATION: 401,
    ErrorKind.PERMISSION: 403,
    ErrorKind.BUDGET: 402,
    ErrorKind.RATE_LIMIT: 429,
    ErrorKind.INVALID_REQUEST: 400,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.NOT_PRICED: 400,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.UPSTREAM_UNREACHABLE: 502,
    ErrorKind.UPSTREAM_TIMEOUT: 504,
    ErrorKind.UPSTREAM_AUTH: 502,
}


class RequestRejected(GatewayKitError):
    """A request is refused before (or instead of) reaching the provider.

    ``details`` is machine-readable extra data merged into the error object (for a budget
    denial: scope, limit, spent, held, remaining, resets_at). ``headers`` are added to the
    response (``Retry-After``, rate-limit headers).
    """

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        details: Mapping[str, object] | None = None,
    ) -> None:
        self.kind = kind
        self.message = message
        self.status = status if status is not None else kind.status
        self.headers = dict(headers or {})
        self.details = dict(details or {})
        super().__init__(message)


def describe_error(exc: BaseException) -> str:
    """``"ClassName: message"`` (just the class when the message is empty), for logs and
    the reasons a settlement or an outbox item records."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
