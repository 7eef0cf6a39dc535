"""The platform protocol's inbound messages as pydantic models (docs/platform-protocol.md).

The control plane is outside data: its resolve answer is validated here, once per
request, by one ``TypeAdapter`` built at import. :func:`parse_resolve_answer` turns any
violation into a ``MalformedAnswer`` whose message names the field (``attempts[1].provider:
…``) and never repeats a value, which may be a provider key.
"""

from __future__ import annotations

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

from gatewaykit.validation import first_problem

__all__ = ["AttemptAnswer", "MalformedAnswer", "ResolveAnswer", "parse_resolve_answer"]

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
