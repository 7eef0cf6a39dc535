"""Upstream HTTP: one client protocol for the adapters, platform mode and the outbox sender.

``default_client()`` is the recommended client (aiohttp, driven directly). An
``httpx.AsyncClient`` or ``httpx2.AsyncClient`` works wherever a client is taken; it is
wrapped by :class:`HttpxClient`. See docs/adapters.md for when to choose which.
"""

from __future__ import annotations

from gatewaykit.http.aiohttp_client import AiohttpClient, default_client
from gatewaykit.http.base import (
    Timeouts,
    UpstreamClient,
    UpstreamResponse,
    as_upstream_client,
    post,
)
from gatewaykit.http.httpx_client import HttpxClient

__all__ = [
    "AiohttpClient",
    "HttpxClient",
    "Timeouts",
    "UpstreamClient",
    "UpstreamResponse",
    "as_upstream_client",
    "default_client",
    "post",
]
