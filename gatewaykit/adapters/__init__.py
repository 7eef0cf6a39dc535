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

from gatewaykit.adapters.anthropic import MessagesStreamUsage, anthropic_messages
from gatewaykit.adapters.endpoint import ProxyEndpoint
from gatewaykit.adapters.openai_chat import ChatStreamUsage, openai_chat_completions
from gatewaykit.adapters.openai_responses import ResponsesStreamUsage, openai_responses
from gatewaykit.adapters.openapi import openapi_paths
from gatewaykit.adapters.reading import StreamUsage
from gatewaykit.http import UpstreamClient, default_client

__all__ = [
    "ChatStreamUsage",
    "MessagesStreamUsage",
    "ProxyEndpoint",
    "ResponsesStreamUsage",
    "StreamUsage",
    "anthropic_messages",
    "default_client",
    "gateway_routes",
    "openai_chat_completions",
    "openapi_paths",
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
) -> list[Route]:
    """The three adapters as POST routes: ``{prefix}/chat/completions``,
    ``{prefix}/messages`` and ``{prefix}/responses``, sharing one ``client``
    (:func:`default_client`, or an httpx/httpx2 ``AsyncClient``)."""
    timeouts: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "first_chunk_timeout": first_chunk_timeout,
        "max_response_bytes": max_response_bytes,
    }
    prefix = prefix.rstrip("/")
    chat = openai_chat_completions(
        client=client, inject_stream_usage=inject_stream_usage, **timeouts
    )
    return [
        Route(f"{prefix}/chat/completions", chat, methods=["POST"]),
        Route(
            f"{prefix}/messages", anthropic_messages(client=client, **timeouts), methods=["POST"]
        ),
        Route(f"{prefix}/responses", openai_responses(client=client, **timeouts), methods=["POST"]),
    ]
