"""``gateway_routes``: the three endpoints as Starlette routes sharing one client."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route
from typing_extensions import Unpack

from gatewaykit.adapters.anthropic import anthropic_messages
from gatewaykit.adapters.openai_chat import openai_chat_completions
from gatewaykit.adapters.openai_responses import openai_responses
from gatewaykit.adapters.options import EndpointOptions
from gatewaykit.http import UpstreamClient

__all__ = ["gateway_routes"]


def gateway_routes(
    *,
    client: UpstreamClient | Any,
    prefix: str = "/v1",
    inject_stream_usage: bool = True,
    **options: Unpack[EndpointOptions],
) -> list[Route]:
    """The three adapters as POST routes: ``{prefix}/chat/completions``,
    ``{prefix}/messages`` and ``{prefix}/responses``, sharing one ``client``
    (:func:`default_client`, or an httpx/httpx2 ``AsyncClient``) and ``options``
    (timeouts and the body cap, as for :func:`openai_chat_completions`)."""
    prefix = prefix.rstrip("/")
    chat = openai_chat_completions(
        client=client, inject_stream_usage=inject_stream_usage, **options
    )
    return [
        Route(f"{prefix}/chat/completions", chat, methods=["POST"]),
        Route(f"{prefix}/messages", anthropic_messages(client=client, **options), methods=["POST"]),
        Route(f"{prefix}/responses", openai_responses(client=client, **options), methods=["POST"]),
    ]
