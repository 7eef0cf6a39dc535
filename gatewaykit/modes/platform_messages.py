"""The platform protocol's inbound messages as pydantic models (docs/platform-protocol.md).

The control plane is outside data: its resolve answer is validated here, once per
request, by one ``TypeAdapter`` built at import. :func:`parse_resolve_answer` turns any
violation into a ``MalformedAnswer`` whose message names the field (``attempts[1].provider:
…``) and never repeats a value, which may be a provider key.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError, ErrorKind, RequestRejected
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.validation import first_problem

__all__ = [
    "AttemptAnswer",
    "MalformedAnswer",
    "ResolveAnswer",
    "control_plane_refusal",
    "parse_attempts",
    "parse_resolve_answer",
    "unavailable",
]

logger = logging.getLogger("gatewaykit.platform")

_PROVIDERS: dict[str, Literal["openai", "anthropic"]] = {
    "openai": "openai",
    "openai-compatible": "openai",
    "openai_compatible": "openai",
    "anthropic": "anthropic",
}


class MalformedAnswer(ValueError):
    """The control plane's resolve answer does not follow the protocol."""


def _provider(value: Any) -> Any:
    """The synonyms the protocol accepts, in any case; anything else fails the Literal."""
    return _PROVIDERS.get(value.lower(), value) if isinstance(value, str) else value


def _blank_is_missing(value: Any) -> Any:
    return None if value == {} else value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


class AttemptAnswer(BaseModel):
    """One way to serve the request; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    attempt_id: Annotated[str, StringConstraints(max_length=255), AfterValidator(_not_blank)]
    provider: Annotated[Literal["openai", "anthropic"], BeforeValidator(_provider)]
    base_url: str
    model: Annotated[str, StringConstraints(min_length=1)] | None = None
    api_key: str | None = Field(default=None, repr=False)
    headers: Annotated[dict[str, str] | None, BeforeValidator(_blank_is_missing)] = Field(
        default=None, repr=False
    )


class ResolveAnswer(BaseModel):
    """The 200 answer to ``POST /v1/resolve``; unknown fields are ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    request_id: Any = None  # compared with the id sent: any other value is malformed
    user_id: str | None = None
    attempts: Annotated[list[AttemptAnswer], Field(min_length=1)]


_RESOLVE_ANSWER = TypeAdapter(ResolveAnswer)


def parse_resolve_answer(data: Any) -> ResolveAnswer:
    """``data`` (decoded JSON, or None when the body was not JSON) as a ResolveAnswer."""
    try:
        return _RESOLVE_ANSWER.validate_python(data)
    except ValidationError as exc:
        raise MalformedAnswer(first_problem(exc, whole="the answer")) from None


_RELAYED = {
    401: ErrorKind.AUTHENTICATION,
    402: ErrorKind.BUDGET,
    403: ErrorKind.PERMISSION,
    404: ErrorKind.NOT_FOUND,
    429: ErrorKind.RATE_LIMIT,
}
_DEFAULT_MESSAGES = {
    401: "invalid API key",
    402: "budget exceeded",
    403: "this key may not make this request",
    404: "model not found",
    429: "rate limit exceeded",
}
_RESERVED_ERROR_FIELDS = frozenset({"type", "message", "code", "param"})
_MAX_MESSAGE = 500


def _serves(provider: str, fmt: WireFormat | None) -> bool:
    if fmt is None:
        return True
    return (provider == "anthropic") == (not fmt.is_openai)


def parse_attempts(data: Any, request: GatewayRequest) -> tuple[str | None, tuple[Attempt, ...]]:
    """The user and the attempts of a 200 resolve answer; those that cannot serve this
    endpoint's format are skipped. Raises MalformedAnswer."""
    answer = parse_resolve_answer(data)
    if answer.request_id is not None and answer.request_id != request.request_id:
        raise MalformedAnswer("request_id does not match the one sent")
    attempts: list[Attempt] = []
    seen: set[str] = set()
    for index, item in enumerate(answer.attempts):
        if item.attempt_id in seen:
            raise MalformedAnswer(f"attempts[{index}].attempt_id {item.attempt_id!r} repeated")
        seen.add(item.attempt_id)
        attempt = _attempt(item, index, request.parsed.model)
        if _serves(attempt.upstream.provider, request.format):
            attempts.append(attempt)
        else:
            logger.warning(
                "resolve of %s: skipping attempt %s (%s cannot serve %s)",
                request.request_id,
                attempt.attempt_id,
                attempt.upstream.provider,
                request.format.value if request.format else request.path,
            )
    if not attempts:
        raise MalformedAnswer("no attempt can serve this endpoint")
    return answer.user_id, tuple(attempts)


def _attempt(item: AttemptAnswer, index: int, default_model: str) -> Attempt:
    try:
        upstream = Upstream(
            base_url=item.base_url,
            api_key=item.api_key,
            provider=item.provider,
            headers=dict(item.headers or {}),
            name=item.attempt_id,
        )
    except ConfigurationError as exc:
        # Upstream's own words: which field is wrong, never a key or header value.
        raise MalformedAnswer(f"attempts[{index}]: {exc}") from None
    return Attempt(attempt_id=item.attempt_id, upstream=upstream, model=item.model or default_model)


def unavailable(message: str) -> RequestRejected:
    """A 503 the client may retry (the control plane could not decide)."""
    return RequestRejected(ErrorKind.UNAVAILABLE, f"{message}; please retry shortly")


def control_plane_refusal(
    request_id: str, status: int, data: Any, headers: Mapping[str, str]
) -> RequestRejected:
    """What the client is told when resolve answered ``status`` (not 200) with ``data``.

    401/402/403/404/429 are relayed with the control plane's message and simple extra
    fields (and a 429's ``Retry-After``); anything else is a 503.
    """
    error = data.get("error") if isinstance(data, dict) else None
    error = error if isinstance(error, dict) else {}
    if status == 401 and error.get("type") == "invalid_gateway_token":
        logger.error("the control plane refused this gateway's token (resolve answered 401)")
        return unavailable("the control plane refused this gateway's credentials")
    kind = _RELAYED.get(status)
    if kind is None:
        logger.warning("resolve of %s: control plane answered HTTP %d", request_id, status)
        return unavailable(f"the control plane answered HTTP {status}")
    message = error.get("message")
    if not isinstance(message, str) or not message.strip():
        message = _DEFAULT_MESSAGES[status]
    details = {
        name: value
        for name, value in error.items()
        if name not in _RESERVED_ERROR_FIELDS
        and isinstance(name, str)
        and (value is None or isinstance(value, (str, int, bool)))
    }
    relayed: dict[str, str] = {}
    retry_after = headers.get("retry-after")
    if status == 429 and retry_after:
        relayed["retry-after"] = retry_after
    return RequestRejected(
        kind,
        message[:_MAX_MESSAGE],
        status=status,
        headers=relayed,
        details=details,
    )
