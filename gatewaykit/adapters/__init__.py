"""Endpoint adapters: thin ASGI endpoints that forward one wire format upstream.

Mount them behind :class:`~gatewaykit.GatewayMiddleware`, which authenticates and holds
the budget before the adapter runs; the adapter forwards the request to the context's
upstream attempts, streams the bytes back unbuffered, reads usage on the side and calls
the settlement's hooks::

    async with default_client() as client:
        app = Starlette(routes=gateway_routes(client=client))

Each adapter is also usable alone (``Route("/v1/messages", anthropic_messages(client=c))``).
"""

from gatewaykit.adapters.anthropic import (
    MessagesStreamUsage,
    anthropic_count_tokens,
    anthropic_messages,
)
from gatewaykit.adapters.models import model_listing
from gatewaykit.adapters.not_found import not_found_endpoint
from gatewaykit.adapters.openai_chat import ChatStreamUsage, openai_chat_completions
from gatewaykit.adapters.openai_embeddings import openai_embeddings
from gatewaykit.adapters.openai_responses import ResponsesStreamUsage, openai_responses
from gatewaykit.adapters.openapi import openapi_paths
from gatewaykit.adapters.routes import gateway_routes
from gatewaykit.http import default_client

__all__ = [
    "ChatStreamUsage",
    "MessagesStreamUsage",
    "ResponsesStreamUsage",
    "anthropic_count_tokens",
    "anthropic_messages",
    "default_client",
    "gateway_routes",
    "model_listing",
    "not_found_endpoint",
    "openai_chat_completions",
    "openai_embeddings",
    "openai_responses",
    "openapi_paths",
]
