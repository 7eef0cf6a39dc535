"""Model listing: which models a credential may use, for ``GET /v1/models``.

:class:`~gatewaykit.GatewayMiddleware` admits a listing request (a ``GET`` of its
``models_path`` or ``models_path/{id}``) the way it admits a gated call, but nothing is
held: it asks the mode (when the mode offers :class:`SupportsModelListing`) for the
models the request's credential may use, answers a refusal (401, 503) in the envelope of
the format the client speaks, and otherwise puts the models in
``scope["gatewaykit.models"]`` for the endpoint (:func:`gatewaykit.adapters.models`) to
render. A client that sends ``anthropic-version`` speaks Anthropic's format and is
offered the models Anthropic upstreams serve; any other, OpenAI's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from starlette.types import ASGIApp, Receive, Scope, Send

from gatewaykit.envelopes import WireFormat, error_body
from gatewaykit.errors import ErrorKind, LedgerError, RequestRejected

__all__ = [
    "MODELS_SCOPE_KEY",
    "ListedModel",
    "SupportsModelListing",
    "admit_listing",
    "is_listing_path",
    "listing_format",
]

#: Where the middleware leaves the models a listing request may see.
MODELS_SCOPE_KEY = "gatewaykit.models"


@dataclasses.dataclass(frozen=True, slots=True)
class ListedModel:
    """A model a credential may use; ``owned_by`` names the upstream that serves it."""

    id: str
    owned_by: str


@runtime_checkable
class SupportsModelListing(Protocol):
    """Optional mode method: the models the credential in ``headers`` may use through
    upstreams of ``provider``; raises :class:`~gatewaykit.errors.RequestRejected` (401)."""

    async def list_models(
        self, headers: Mapping[str, str], *, provider: Literal["openai", "anthropic"]
    ) -> Sequence[ListedModel]: ...


def listing_format(headers: Mapping[str, str]) -> WireFormat:
    """The format a client listing models speaks: Anthropic's SDK sends ``anthropic-version``."""
    if "anthropic-version" in headers:
        return WireFormat.ANTHROPIC_MESSAGES
    return WireFormat.OPENAI_CHAT


def is_listing_path(scope: Scope, models_path: str) -> bool:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path == models_path or (
        path.startswith(models_path) and path[len(models_path) : len(models_path) + 1] == "/"
    )


async def admit_listing(
    mode: object, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """Authenticate a listing request through ``mode`` and call ``app`` with its models.

    A mode that cannot list (``PlatformMode``: the control plane owns the keys) leaves the
    scope without models; the endpoint then answers 404.
    """
    if isinstance(mode, SupportsModelListing):
        headers = _headers(scope)
        fmt = listing_format(headers)
        provider: Literal["openai", "anthropic"] = "openai" if fmt.is_openai else "anthropic"
        try:
            models = await mode.list_models(headers, provider=provider)
        except RequestRejected as rejection:
            await _send_rejection(send, fmt, rejection)
            return
        except LedgerError:
            message = "the budget ledger is unavailable; please retry shortly"
            await _send_rejection(send, fmt, RequestRejected(ErrorKind.UNAVAILABLE, message))
            return
        scope[MODELS_SCOPE_KEY] = tuple(models)
    await app(scope, receive, send)


def _headers(scope: Scope) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in scope.get("headers", ())
    }


async def _send_rejection(send: Send, fmt: WireFormat, rejection: RequestRejected) -> None:
    payload = error_body(fmt, rejection.kind, rejection.message, rejection.details)
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers.extend(
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in rejection.headers.items()
    )
    message: dict[str, Any] = {
        "type": "http.response.start",
        "status": rejection.status,
        "headers": headers,
    }
    await send(message)
    await send({"type": "http.response.body", "body": payload})
