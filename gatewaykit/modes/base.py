"""The strategy seam: how a gated request is authenticated, priced, and admitted."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from gatewaykit.envelopes import WireFormat
from gatewaykit.settlement import GatewayContext

__all__ = ["GatewayRequest", "RequestModeStrategy"]


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayRequest:
    """A gated request as the middleware parsed it, before any mode looked at it.

    ``headers`` has lower-cased names. ``prompt_chars`` is the size of the prompt text
    (for the estimate); ``max_output_tokens`` is the request's own cap, if it set one.
    ``user`` is the end user the body names (OpenAI ``user``, Anthropic
    ``metadata.user_id``), if any. ``choices`` is how many completions the request asks
    for (OpenAI chat's ``n``); each may use the whole output cap, so estimates multiply.
    """

    request_id: str
    path: str
    format: WireFormat | None
    headers: Mapping[str, str] = dataclasses.field(repr=False)
    body: Mapping[str, Any] = dataclasses.field(repr=False)
    model: str
    stream: bool
    prompt_chars: int
    max_output_tokens: int | None
    user: str | None = None
    choices: int = 1


@runtime_checkable
class RequestModeStrategy(Protocol):
    """Standalone, platform, or your own: turns a request into an admitted context.

    ``resolve`` authenticates, finds the user and upstream attempts, prices and holds the
    estimate, and returns the context (with its settlement) that the middleware puts in
    the scope. It raises :class:`~gatewaykit.errors.RequestRejected` to refuse.
    """

    async def resolve(self, request: GatewayRequest) -> GatewayContext: ...
