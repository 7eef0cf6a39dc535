"""Unknown paths under the gateway's prefix: a 404 in the provider's envelope.

An SDK calling an endpoint the gateway does not serve then raises its own
``NotFoundError`` with a readable message, instead of failing to parse a plain-text
"Not Found". The envelope is Anthropic's for a request that carries ``anthropic-version``
(its SDK always does), OpenAI's otherwise. A known path called with the wrong method is
answered the same way, as OpenAI does ("Invalid URL (GET /v1/chat/completions)").
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from gatewaykit.adapters.relay import send_error
from gatewaykit.errors import ErrorKind
from gatewaykit.listing import listing_format

__all__ = ["NotFoundEndpoint", "not_found_endpoint"]


class NotFoundEndpoint:
    """The ASGI endpoint answering every request with a 404 in the client's envelope."""

    def __repr__(self) -> str:
        return "<NotFoundEndpoint>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fmt = listing_format(Headers(scope=scope))
        message = f"Invalid URL ({scope['method']} {scope['path']})"
        details: dict[str, object] | None = (
            {"type": "invalid_request_error", "code": "unknown_url"} if fmt.is_openai else None
        )
        await send_error(send, fmt, ErrorKind.NOT_FOUND, message, details)


def not_found_endpoint() -> NotFoundEndpoint:
    """The catch-all endpoint; :func:`gatewaykit.adapters.gateway_routes` routes
    ``{prefix}/{path}`` to it."""
    return NotFoundEndpoint()
