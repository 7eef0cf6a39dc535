"""The metrics a gateway reports, as a Protocol any metrics library can implement.

GatewayMiddleware calls a recorder at a handful of points per gated request; with no
recorder (the default) it skips every call. Labels are bounded: the route (a configured
path), the model of an admitted request, the outcome and the denial reason — never a
user, a key or a request id. :class:`~gatewaykit.observability.PrometheusMetrics` is the
implementation on prometheus_client.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal, Protocol, runtime_checkable

from gatewaykit.errors import ErrorKind
from gatewaykit.settlement import SettlementOutcome

__all__ = ["DenialReason", "LedgerOp", "MetricsRecorder", "denial_reason"]

#: Why a request was refused before reaching a provider.
DenialReason = Literal["auth", "forbidden", "budget", "rate_limit", "bad_request", "unavailable"]
#: ``admit``: the mode's admission (key lookup and hold, or the platform's resolve call);
#: ``settle``: the settlement's terminal write.
LedgerOp = Literal["admit", "settle"]

_REASONS: dict[ErrorKind, DenialReason] = {
    ErrorKind.AUTHENTICATION: "auth",
    ErrorKind.PERMISSION: "forbidden",
    ErrorKind.BUDGET: "budget",
    ErrorKind.RATE_LIMIT: "rate_limit",
    ErrorKind.INVALID_REQUEST: "bad_request",
    ErrorKind.TOO_LARGE: "bad_request",
    ErrorKind.NOT_FOUND: "bad_request",
    ErrorKind.NOT_PRICED: "bad_request",
    ErrorKind.UNAVAILABLE: "unavailable",
    ErrorKind.UPSTREAM_UNREACHABLE: "unavailable",
    ErrorKind.UPSTREAM_TIMEOUT: "unavailable",
    ErrorKind.UPSTREAM_AUTH: "unavailable",
}


def denial_reason(kind: ErrorKind) -> DenialReason:
    """The ``reason`` label of a refusal of this kind."""
    return _REASONS[kind]


@runtime_checkable
class MetricsRecorder(Protocol):
    """Receives what happened to each gated request; every method must be cheap.

    Per request: ``refused`` once (then ``finished``), or ``admitted``, then ``settled``
    exactly once (before the response's final bytes where the handler settles in time),
    ``first_byte`` at most once, and ``finished`` when the response is done. ``held`` is
    the amount held at admission (USD); ``outcome`` None means the settlement failed.
    """

    def refused(self, route: str, reason: DenialReason, admit_seconds: float | None) -> None:
        """Refused before any provider was asked (``admit_seconds``: None if the mode
        never ran, e.g. an unreadable body)."""

    def admitted(self, route: str, model: str, held: Decimal, admit_seconds: float) -> None:
        """Admitted: a hold of ``held`` USD is live from now on."""

    def settled(
        self,
        route: str,
        model: str,
        held: Decimal,
        outcome: SettlementOutcome | None,
        settle_seconds: float,
    ) -> None:
        """The request's hold was closed with ``outcome``."""

    def first_byte(self, route: str, seconds: float) -> None:
        """The first byte of a successful response went out ``seconds`` after the request
        arrived."""

    def finished(self, route: str, seconds: float) -> None:
        """The gated request ended after ``seconds``."""
