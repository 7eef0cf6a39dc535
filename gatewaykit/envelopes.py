"""Wire formats and their error envelopes, so official SDKs raise the right exception.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``;
Anthropic: ``{"type": "error", "error": {"type", "message"}}`` (docs/errors.md).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping

from gatewaykit.errors import ErrorKind

__all__ = [
    "WireFormat",
    "error_body",
    "error_payload",
    "stream_error_event",
]


class WireFormat(str, enum.Enum):
    """A provider endpoint's request/response format (and so its error envelope)."""

    OPENAI_CHAT = "openai_chat"
    ANTHROPIC_MESSAGES = "anthropic_messages"
    OPENAI_RESPONSES = "openai_responses"
    OPENAI_EMBEDDINGS = "openai_embeddings"
    ANTHROPIC_COUNT_TOKENS = "anthropic_count_tokens"

    @property
    def is_openai(self) -> bool:
        """Whether errors use OpenAI's envelope (else Anthropic's)."""
        return self not in _ANTHROPIC_FORMATS


_ANTHROPIC_FORMATS = frozenset({WireFormat.ANTHROPIC_MESSAGES, WireFormat.ANTHROPIC_COUNT_TOKENS})


# kind -> (OpenAI type, OpenAI code)
_OPENAI = {
    ErrorKind.AUTHENTICATION: ("invalid_request_error", "invalid_api_key"),
    ErrorKind.PERMISSION: ("permission_error", "permission_denied"),
    ErrorKind.BUDGET: ("insufficient_quota", "budget_exceeded"),
    ErrorKind.RATE_LIMIT: ("rate_limit_error", "rate_limit_exceeded"),
    ErrorKind.INVALID_REQUEST: ("invalid_request_error", None),
    ErrorKind.TOO_LARGE: ("invalid_request_error", "request_too_large"),
    ErrorKind.NOT_FOUND: ("not_found_error", "model_not_found"),
    ErrorKind.NOT_PRICED: ("invalid_request_error", "model_not_priced"),
    ErrorKind.UNAVAILABLE: ("api_error", "service_unavailable"),
    ErrorKind.UPSTREAM_UNREACHABLE: ("api_error", "upstream_unreachable"),
    ErrorKind.UPSTREAM_TIMEOUT: ("api_error", "upstream_timeout"),
    ErrorKind.UPSTREAM_AUTH: ("api_error", "upstream_authentication_failed"),
}

_ANTHROPIC = {
    ErrorKind.AUTHENTICATION: "authentication_error",
    ErrorKind.PERMISSION: "permission_error",
    ErrorKind.BUDGET: "billing_error",
    ErrorKind.RATE_LIMIT: "rate_limit_error",
    ErrorKind.INVALID_REQUEST: "invalid_request_error",
    ErrorKind.TOO_LARGE: "request_too_large",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.NOT_PRICED: "invalid_request_error",
    ErrorKind.UNAVAILABLE: "api_error",
    ErrorKind.UPSTREAM_UNREACHABLE: "api_error",
    ErrorKind.UPSTREAM_TIMEOUT: "api_error",
    ErrorKind.UPSTREAM_AUTH: "api_error",
}


def error_payload(
    fmt: WireFormat,
    kind: ErrorKind,
    message: str,
    details: Mapping[str, object] | None = None,
) -> dict[str, object]:
    """The error object in ``fmt``'s envelope; ``details`` are merged into the inner object."""
    if not fmt.is_openai:
        inner: dict[str, object] = {"type": _ANTHROPIC[kind], "message": message}
        inner.update(details or {})
        return {"type": "error", "error": inner}
    type_, code = _OPENAI[kind]
    inner = {"message": message, "type": type_, "param": None, "code": code}
    inner.update(details or {})
    return {"error": inner}


def error_body(
    fmt: WireFormat,
    kind: ErrorKind,
    message: str,
    details: Mapping[str, object] | None = None,
) -> bytes:
    return json.dumps(error_payload(fmt, kind, message, details), separators=(",", ":")).encode()


def stream_error_event(fmt: WireFormat, kind: ErrorKind, message: str) -> bytes:
    """An in-band SSE error for a stream that already started, in the format's own shape.

    OpenAI chat: a ``data:`` error object then ``[DONE]``; Anthropic: ``event: error``;
    responses: a ``response.failed``-style ``error`` event.
    """
    payload = error_payload(fmt, kind, message)
    if not fmt.is_openai:
        return b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
    if fmt is WireFormat.OPENAI_CHAT:
        return b"data: " + json.dumps(payload).encode() + b"\n\ndata: [DONE]\n\n"
    inner = payload["error"]
    assert isinstance(inner, dict)
    event = {"type": "error", "code": inner["code"], "message": message, "param": None}
    return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"
