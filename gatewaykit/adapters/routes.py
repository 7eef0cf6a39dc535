"""``gateway_routes``: every adapter as a Starlette route, sharing one client."""

from __future__ import annotations

from typing import Any, cast

from starlette.routing import Route
from typing_extensions import Unpack

from gatewaykit.adapters.anthropic import anthropic_count_tokens, anthropic_messages
from gatewaykit.adapters.models import model_listing
from gatewaykit.adapters.not_found import not_found_endpoint
from gatewaykit.adapters.openai_chat import openai_chat_completions
from gatewaykit.adapters.openai_embeddings import openai_embeddings
from gatewaykit.adapters.openai_responses import openai_responses
from gatewaykit.adapters.options import EndpointOptions, UnaryEndpointOptions
from gatewaykit.http import UpstreamClient

__all__ = ["gateway_routes"]


def gateway_routes(
    *,
    client: UpstreamClient | Any,
    prefix: str = "/v1",
    inject_stream_usage: bool = True,
    catch_all: bool = True,
    **options: Unpack[EndpointOptions],
) -> list[Route]:
    """Every adapter as a route, sharing one ``client`` (:func:`default_client`, or an
    httpx/httpx2 ``AsyncClient``) and ``options`` (timeouts and the body cap,
    :class:`~gatewaykit.adapters.options.EndpointOptions`): POST
    ``{prefix}/chat/completions``, ``{prefix}/messages``, ``{prefix}/responses``,
    ``{prefix}/embeddings`` and ``{prefix}/messages/count_tokens``; GET
    ``{prefix}/models`` and ``{prefix}/models/{model_id}``; and, last (unless
    ``catch_all=False``), any other ``{prefix}/…`` path or method as a 404 in the
    provider's envelope. Routes listed after these under the same prefix are never
    reached: put yours first."""
    unary = cast(
        UnaryEndpointOptions,
        {name: value for name, value in options.items() if name != "first_chunk_timeout"},
    )
    prefix = prefix.rstrip("/")
    chat = openai_chat_completions(
        client=client, inject_stream_usage=inject_stream_usage, **options
    )
    listing = model_listing()
    routes = [
        Route(f"{prefix}/chat/completions", chat, methods=["POST"]),
        Route(f"{prefix}/messages", anthropic_messages(client=client, **options), methods=["POST"]),
        Route(f"{prefix}/responses", openai_responses(client=client, **options), methods=["POST"]),
        Route(f"{prefix}/embeddings", openai_embeddings(client=client, **unary), methods=["POST"]),
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
