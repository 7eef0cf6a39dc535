"""The strategy seam: how a gated request is authenticated, priced, and admitted."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.parsing import ParsedRequest

__all__ = ["GatewayRequest", "RequestModeStrategy"]


@dataclasses.dataclass(frozen=True, slots=True)
class GatewayRequest:
    """A gated request as the middleware read it, before any mode looked at it.

    ``headers`` has lower-cased names. ``body`` is the decoded JSON object and
    ``raw_body`` the bytes the client sent (forwarded as they are where nothing needs
    rewriting). ``parsed`` is what the estimate and the mode need: model, stream flag,
    prompt size, output cap, the end user the body names, completions asked for.
    """

    request_id: str
    path: str
    format: WireFormat | None
    headers: Mapping[str, str] = dataclasses.field(repr=False)
    body: Mapping[str, Any] = dataclasses.field(repr=False)
    raw_body: bytes = dataclasses.field(repr=False)
    parsed: ParsedRequest


@runtime_checkable
class RequestModeStrategy(Protocol):
    """Standalone, platform, or your own: turns a request into an admitted context.

    ``resolve`` authenticates, finds the user and upstream attempts, prices and holds the
    estimate, and returns the context (with its settlement) that the middleware puts in
    the scope. It raises :class:`~gatewaykit.errors.RequestRejected` to refuse.

    A cancellation may reach ``resolve`` at any await (the client left, the server stops).
    By default the middleware therefore runs it in a task of its own behind
    ``asyncio.shield`` and closes a finished admission whose request is gone. A mode whose
    ``resolve``, when cancelled, undoes whatever it held (as
    :class:`~gatewaykit.modes.standalone.StandaloneMode` releases its hold over SQLite)
    may say so with a ``cancel_safe`` attribute or property that is true, defined on its
    own class (a subclass inherits nothing): the middleware then awaits it in the
    request's own task, a task and a shield fewer per request.
    """

    async def resolve(self, request: GatewayRequest) -> GatewayContext: ...
