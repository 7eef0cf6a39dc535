"""The gateway context: what GatewayMiddleware learned about a request, in its scope.

Handlers read it with :func:`get_context` (adapters: attempts, body, stream flag) or just
its settlement with :func:`gatewaykit.get_settlement`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import SettlementMissingError
from gatewaykit.upstream import Attempt

if TYPE_CHECKING:
    from gatewaykit.settlement import Settlement

__all__ = ["SCOPE_KEY", "GatewayContext", "get_context"]

#: The one key GatewayMiddleware writes into the ASGI scope.
SCOPE_KEY = "gatewaykit"


@dataclasses.dataclass(slots=True)
class GatewayContext:
    """What GatewayMiddleware learned about a gated request, stored in ``scope["gatewaykit"]``.

    ``body`` is the decoded request and ``raw_body`` the client's bytes (empty when the
    context was built without them): adapters forward the bytes unchanged where the
    attempt needs no rewrite. ``response_headers`` are added by the middleware to the
    response start message.
    """

    request_id: str
    settlement: Settlement
    format: WireFormat | None
    model: str
    stream: bool
    body: Mapping[str, Any]
    attempts: tuple[Attempt, ...] = ()
    user_id: str | None = None
    key_id: str | None = None
    response_headers: MutableMapping[str, str] = dataclasses.field(default_factory=dict)
    raw_body: bytes = dataclasses.field(default=b"", repr=False)


def get_context(conn: Any) -> GatewayContext:
    """The gateway context of a request (a Starlette ``Request``/``HTTPConnection`` or scope)."""
    if type(conn) is dict:  # an ASGI scope: no ABC checks on the request path
        context = conn.get(SCOPE_KEY)
    else:
        scope = conn if isinstance(conn, MutableMapping) else getattr(conn, "scope", None)
        context = scope.get(SCOPE_KEY) if isinstance(scope, Mapping) else None
    if not isinstance(context, GatewayContext):
        raise SettlementMissingError(
            "no gatewaykit settlement on this request: GatewayMiddleware did not handle it. "
            "Add GatewayMiddleware to the app and list this path in its routes."
        )
    return context
