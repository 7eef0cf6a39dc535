"""Endpoint adapters: thin ASGI endpoints that forward one wire format upstream.

Mount them behind :class:`~gatewaykit.GatewayMiddleware`, which authenticates and holds
the budget before the adapter runs; the adapter forwards the request to the context's
upstream attempts, streams the bytes back unbuffered, reads usage on the side and calls
the settlement's hooks::

    async with default_client() as client:
        app = Starlette(routes=gateway_routes(client=client))

Each adapter is also usable alone (``Route("/v1/messages", anthropic_messages(client=c))``).
"""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

from gatewaykit.adapters.anthropic import (
    MessagesStreamUsage,
    anthropic_count_tokens,
    anthropic_messages,
)
from gatewaykit.adapters.endpoint import ProxyEndpoint
from gatewaykit.adapters.models import ModelListing, model_listing
from gatewaykit.adapters.not_found import NotFoundEndpoint, not_found_endpoint
from gatewaykit.adapters.openai_chat import ChatStreamUsage, openai_chat_completions
from gatewaykit.adapters.openai_embeddings import openai_embeddings
from gatewaykit.adapters.openai_responses import ResponsesStreamUsage, openai_responses
from gatewaykit.adapters.reading import StreamUsage
from gatewaykit.http import UpstreamClient, default_client

__all__ = [
    "ChatStreamUsage",
    "MessagesStreamUsage",
    "ModelListing",
    "NotFoundEndpoint",
    "ProxyEndpoint",
    "ResponsesStreamUsage",
    "StreamUsage",
    "anthropic_count_tokens",
    "anthropic_messages",
    "default_client",
    "gateway_routes",
    "model_listing",
    "not_found_endpoint",
    "openai_chat_completions",
    "openai_embeddings",
    "openai_responses",
]


def gateway_routes(
    *,
    client: UpstreamClient | Any,
    prefix: str = "/v1",
    connect_timeout: float | None = 10.0,
    read_timeout: float | None = 600.0,
    first_chunk_timeout: float | None = None,
    max_response_bytes: int = 64 * 1024 * 1024,
    inject_stream_usage: bool = True,
    catch_all: bool = True,
) -> list[Route]:
    """Every adapter as a route, sharing one ``client`` (:func:`default_client`, or an
    httpx/httpx2 ``AsyncClient``): POST ``{prefix}/chat/completions``,
    ``{prefix}/messages``, ``{prefix}/responses``, ``{prefix}/embeddings`` and
    ``{prefix}/messages/count_tokens``; GET ``{prefix}/models`` and
    ``{prefix}/models/{model_id}``; and, last (unless ``catch_all=False``), any other
    ``{prefix}/…`` path or method as a 404 in the provider's envelope. Routes listed
    after these under the same prefix are never reached: put yours first."""
    timeouts: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "first_chunk_timeout": first_chunk_timeout,
        "max_response_bytes": max_response_bytes,
    }
    unary: dict[str, Any] = {"connect_timeout": connect_timeout, "read_timeout": read_timeout}
    prefix = prefix.rstrip("/")
    chat = openai_chat_completions(
        client=client, inject_stream_usage=inject_stream_usage, **timeouts
    )
    listing = model_listing()
    routes = [
        Route(f"{prefix}/chat/completions", chat, methods=["POST"]),
        Route(
            f"{prefix}/messages", anthropic_messages(client=client, **timeouts), methods=["POST"]
        ),
        Route(f"{prefix}/responses", openai_responses(client=client, **timeouts), methods=["POST"]),
        Route(
            f"{prefix}/embeddings",
            openai_embeddings(client=client, max_response_bytes=max_response_bytes, **unary),
            methods=["POST"],
        ),
        Route(
            f"{prefix}/messages/count_tokens",
            anthropic_count_tokens(client=client, **unary),
            methods=["POST"],
        ),
        Route(f"{prefix}/models", listing, methods=["GET"]),
        Route(f"{prefix}/models/{{model_id:path}}", listing, methods=["GET"]),
    ]
    if catch_all:
        routes.append(Route(f"{prefix}/{{path:path}}", not_found_endpoint()))
    return routes
