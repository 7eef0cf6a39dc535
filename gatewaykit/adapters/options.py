"""The keyword options the endpoint factories and ``gateway_routes`` take, typed once.

The defaults live once, in :class:`~gatewaykit.adapters.endpoint.ProxyEndpoint`.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["EndpointOptions", "UnaryEndpointOptions"]


class UnaryEndpointOptions(TypedDict, total=False):
    """Options of the endpoints that never stream (embeddings, count_tokens).

    Timeouts are seconds (None: no limit): ``connect_timeout`` (default 10) and
    ``read_timeout`` (default 600) bound each upstream exchange; ``max_response_bytes``
    (default 64 MiB) caps an answer read whole."""

    connect_timeout: float | None
    read_timeout: float | None
    max_response_bytes: int


class EndpointOptions(UnaryEndpointOptions, total=False):
    """Options of the streaming endpoints (chat completions, messages, responses): the
    unary ones, and ``first_chunk_timeout`` (default None), which bounds the connect and
    the wait for a stream's first real event, after which the next attempt is tried."""

    first_chunk_timeout: float | None
