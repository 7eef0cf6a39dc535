"""Model listing (``GET /v1/models``, ``GET /v1/models/{model_id}``) in either SDK's shape.

The endpoint renders what :class:`~gatewaykit.GatewayMiddleware` admitted
(:mod:`gatewaykit.listing`): the models the request's key may use. OpenAI's list shape by
default; Anthropic's when the request carries ``anthropic-version`` (its SDK always does).
A model the key may not use is a 404 in the same envelope; so is every listing request
when the mode cannot list models (``PlatformMode``) or the middleware did not run.
The gateway knows no creation dates: ``created`` is 0 (Anthropic: the epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from gatewaykit.adapters.relay import send_error
from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ErrorKind
from gatewaykit.listing import MODELS_SCOPE_KEY, ListedModel, listing_format

__all__ = ["ModelListing", "model_listing"]

_EPOCH = "1970-01-01T00:00:00Z"


class ModelListing:
    """The ASGI endpoint; route ``{prefix}/models`` and ``{prefix}/models/{model_id:path}``
    to it (:func:`gatewaykit.adapters.gateway_routes` does)."""

    def __repr__(self) -> str:
        return "<ModelListing>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fmt = listing_format(Headers(scope=scope))
        models: Sequence[ListedModel] | None = scope.get(MODELS_SCOPE_KEY)
        if models is None:
            message = "this gateway does not list models"
            details: dict[str, object] | None = {"code": "unknown_url"} if fmt.is_openai else None
            await send_error(send, fmt, ErrorKind.NOT_FOUND, message, details)
            return
        model_id = scope.get("path_params", {}).get("model_id")
        if model_id is None:
            payload = _list(fmt, models)
        else:
            found = next((m for m in models if m.id == model_id), None)
            if found is None:
                message = f"The model '{model_id}' does not exist or this key may not use it"
                details = {"param": "model"} if fmt.is_openai else None
                await send_error(send, fmt, ErrorKind.NOT_FOUND, message, details)
                return
            payload = _model(fmt, found)
        await JSONResponse(payload)(scope, receive, send)


def _model(fmt: WireFormat, model: ListedModel) -> dict[str, Any]:
    if fmt.is_openai:
        return {"id": model.id, "object": "model", "created": 0, "owned_by": model.owned_by}
    return {"type": "model", "id": model.id, "display_name": model.id, "created_at": _EPOCH}


def _list(fmt: WireFormat, models: Sequence[ListedModel]) -> dict[str, Any]:
    data = [_model(fmt, model) for model in models]
    if fmt.is_openai:
        return {"object": "list", "data": data}
    return {
        "data": data,
        "has_more": False,
        "first_id": models[0].id if models else None,
        "last_id": models[-1].id if models else None,
    }


def model_listing() -> ModelListing:
    """The model listing endpoint: an ASGI app to mount behind GatewayMiddleware."""
    return ModelListing()
