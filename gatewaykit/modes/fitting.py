"""Holds that fit the remaining budget (``StandaloneMode(over_budget="fit")``).

A request is held at its worst case: the prompt plus its whole output cap. When that does
not fit, a smaller output cap often does; the ledger picks the largest one inside its
atomic reserve (:class:`~gatewaykit.ledger.base.OutputFit`), and the request goes upstream
with that cap written into its body, so the provider stops there and the charge cannot
exceed what was held.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, localcontext
from typing import Any

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import OutputFit
from gatewaykit.parsing import MIN_THINKING_BUDGET
from gatewaykit.pricing import ModelPrice
from gatewaykit.settlement import RequestEstimate

__all__ = [
    "FITTED_FORMATS",
    "MAX_OUTPUT_TOKENS_HEADER",
    "least_fitted_tokens",
    "output_fit",
    "with_output_limit",
]

#: Tells the client the output cap its request was sent upstream with, when it was fitted.
MAX_OUTPUT_TOKENS_HEADER = "x-gatewaykit-max-output-tokens"
_MTOK = Decimal(1_000_000)
#: The formats whose requests carry an output cap to fit (embeddings have no output).
FITTED_FORMATS = frozenset(
    {WireFormat.OPENAI_CHAT, WireFormat.ANTHROPIC_MESSAGES, WireFormat.OPENAI_RESPONSES}
)


def output_fit(
    estimate: RequestEstimate, price: ModelPrice, *, choices: int, min_output_tokens: int
) -> OutputFit:
    """The fit of ``estimate``: its prompt as the base, each output token (of every one of
    ``choices`` completions) at the output price, between ``min_output_tokens`` (or the
    request's own smaller cap) and the request's cap."""
    cap = estimate.max_output_tokens // choices
    with localcontext() as ctx:
        ctx.prec = 80  # exact: products and quotients by powers of ten of short decimals
        base = estimate.prompt_tokens * price.dearest_input / _MTOK
        per_token = price.output_per_mtok * choices / _MTOK
    return OutputFit(
        base=base, per_token=per_token, min_tokens=min(min_output_tokens, cap), max_tokens=cap
    )


def least_fitted_tokens(fmt: WireFormat | None, body: Mapping[str, Any], configured: int) -> int:
    """The smallest output cap a request may be fitted down to: ``configured``, but never
    below what leaves an Anthropic request's extended thinking its least budget (the
    fitted body lowers ``budget_tokens`` under the cap; under 1,024 the provider would
    refuse the request)."""
    if fmt is WireFormat.ANTHROPIC_MESSAGES:
        thinking = body.get("thinking")
        if isinstance(thinking, Mapping) and thinking.get("type") == "enabled":
            return max(configured, MIN_THINKING_BUDGET + 1)
    return configured


def with_output_limit(fmt: WireFormat, body: Mapping[str, Any], tokens: int) -> dict[str, Any]:
    """``body`` with its output cap set to ``tokens``, in the field(s) its format uses.

    Chat completions: every cap the client sent (``max_completion_tokens``, the legacy
    ``max_tokens``), else ``max_completion_tokens``. Anthropic messages: ``max_tokens``,
    and a ``thinking.budget_tokens`` not below it is lowered under it (Anthropic refuses
    it otherwise). Responses: ``max_output_tokens``.
    """
    rewritten = dict(body)
    if fmt is WireFormat.OPENAI_CHAT:
        fields = [f for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None]
        for field in fields or ["max_completion_tokens"]:
            rewritten[field] = tokens
    elif fmt is WireFormat.ANTHROPIC_MESSAGES:
        rewritten["max_tokens"] = tokens
        thinking = body.get("thinking")
        if isinstance(thinking, Mapping):
            budget = thinking.get("budget_tokens")
            if type(budget) is int and budget >= tokens:  # Anthropic wants it below the cap
                rewritten["thinking"] = {**thinking, "budget_tokens": tokens - 1}
    elif fmt is WireFormat.OPENAI_RESPONSES:
        rewritten["max_output_tokens"] = tokens
    else:
        raise ConfigurationError(f"{fmt.value} requests have no output cap to fit")
    return rewritten
