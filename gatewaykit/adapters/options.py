"""``EndpointOptions``: the keyword options every endpoint factory and ``gateway_routes`` take.

The defaults live once, in :class:`~gatewaykit.adapters.endpoint.ProxyEndpoint`.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["EndpointOptions"]


class EndpointOptions(TypedDict, total=False):
    """Timeouts are seconds (None: no limit). ``connect_timeout`` (default 10) and
    ``read_timeout`` (default 600) bound each upstream exchange; ``first_chunk_timeout``
    (default None) bounds the connect and the wait for a stream's first real event, after
    which the next attempt is tried; ``max_response_bytes`` (default 64 MiB) caps a
    non-streaming answer."""

    connect_timeout: float | None
    read_timeout: float | None
    first_chunk_timeout: float | None
    max_response_bytes: int
