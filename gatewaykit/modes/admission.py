"""The admission steps every mode shares: the credential, the endpoint's name, the estimate.

StandaloneMode and PlatformMode (and custom modes) read a request the same way up to the
point where they decide who pays: this module is that part, written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError, ErrorKind, InvalidAmountError, RequestRejected
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.pricing import ModelPrice, estimate_cost, estimate_prompt_tokens
from gatewaykit.settlement import RequestEstimate

__all__ = [
    "ENDPOINTS",
    "PROVIDERS",
    "check_default_max_output_tokens",
    "credential",
    "endpoint_name",
    "estimate",
    "missing_credential",
]

#: The endpoint name recorded for each wire format (usage records, platform reports).
ENDPOINTS: Mapping[WireFormat, str] = {
    WireFormat.OPENAI_CHAT: "chat.completions",
    WireFormat.ANTHROPIC_MESSAGES: "messages",
    WireFormat.OPENAI_RESPONSES: "responses",
    WireFormat.OPENAI_EMBEDDINGS: "embeddings",
    WireFormat.ANTHROPIC_COUNT_TOKENS: "messages.count_tokens",
}
#: Which upstream provider serves each wire format.
PROVIDERS: Mapping[WireFormat, str] = {
    WireFormat.OPENAI_CHAT: "openai",
    WireFormat.ANTHROPIC_MESSAGES: "anthropic",
    WireFormat.OPENAI_RESPONSES: "openai",
    WireFormat.OPENAI_EMBEDDINGS: "openai",
    WireFormat.ANTHROPIC_COUNT_TOKENS: "anthropic",
}


def endpoint_name(request: GatewayRequest) -> str:
    """The format's endpoint name, or the path of a custom gated route."""
    fmt = request.format
    return ENDPOINTS.get(fmt, request.path) if fmt is not None else request.path


def credential(headers: Mapping[str, str]) -> str | None:
    """The key a client presents: ``Authorization: Bearer <key>`` or ``x-api-key``."""
    authorization = headers.get("authorization", "").strip()
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    api_key = headers.get("x-api-key", "").strip()
    return api_key or None


def missing_credential() -> RequestRejected:
    return RequestRejected(
        ErrorKind.AUTHENTICATION,
        "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'",
    )


def check_default_max_output_tokens(value: object) -> int:
    """A mode's ``default_max_output_tokens``, checked: an int, not negative."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError("default_max_output_tokens must be an int")
    if value < 0:
        raise ConfigurationError("default_max_output_tokens must not be negative")
    return value


def estimate(
    request: GatewayRequest,
    price: ModelPrice | None,
    *,
    default_max_output_tokens: int,
    extra_prompt_tokens: int = 0,
) -> RequestEstimate:
    """What to hold: the prompt at the dearest input rate plus the output cap (the
    request's own, else ``default_max_output_tokens``), times OpenAI's ``n``.

    ``price`` None is an unbudgeted request, and an unmetered one (``parsed.metered``
    False) is free: both amount 0. ``extra_prompt_tokens`` is context
    billed beyond the body (a stored response a request continues). An output cap no
    ledger could hold is the client's 400.
    """
    parsed = request.parsed
    prompt_tokens = estimate_prompt_tokens(parsed.prompt_chars) + extra_prompt_tokens
    max_output = parsed.max_output_tokens
    if max_output is None:
        max_output = default_max_output_tokens
    max_output *= parsed.choices  # every completion may use the whole cap
    amount = Decimal(0)
    if price is not None and parsed.metered:
        try:
            amount = estimate_cost(price, prompt_tokens=prompt_tokens, max_output_tokens=max_output)
        except InvalidAmountError:
            raise RequestRejected(
                ErrorKind.INVALID_REQUEST,
                f"the request's output token limit ({max_output}) is too large to budget for",
            ) from None
    return RequestEstimate(prompt_tokens=prompt_tokens, max_output_tokens=max_output, amount=amount)
