"""The fit of a request (gatewaykit.modes.fitting): its full hold is exactly the estimate,
and a fitted cap lands in the field each format reads."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError
from gatewaykit.modes.fitting import (
    FITTED_FORMATS,
    least_fitted_tokens,
    output_fit,
    with_output_limit,
)
from gatewaykit.money import to_nanos
from gatewaykit.pricing import ModelPrice, estimate_cost
from gatewaykit.settlement import RequestEstimate

PRICES = [
    ModelPrice(Decimal("2.50"), Decimal("10.00"), Decimal("1.25")),
    ModelPrice(Decimal("0.15"), Decimal("0.60")),
    ModelPrice(Decimal(3), Decimal(15), Decimal("0.30"), Decimal("3.75")),
    # Beyond the integer fast path: more than 15 decimal places.
    ModelPrice(Decimal("0.0000000000000001234"), Decimal("0.1234567890123456789")),
]


@pytest.mark.parametrize("price", PRICES)
@pytest.mark.parametrize(("prompt", "cap", "choices"), [(3, 4096, 1), (12_345, 1000, 3), (0, 1, 1)])
def test_the_full_fit_is_the_estimate(
    price: ModelPrice, prompt: int, cap: int, choices: int
) -> None:
    amount = estimate_cost(price, prompt_tokens=prompt, max_output_tokens=cap * choices)
    estimate = RequestEstimate(prompt_tokens=prompt, max_output_tokens=cap * choices, amount=amount)
    fit = output_fit(estimate, price, choices=choices, min_output_tokens=256)
    assert fit.nanos(fit.max_tokens) == to_nanos(amount)
    assert fit.max_tokens == cap
    assert fit.min_tokens == min(256, cap)  # a request asking for fewer keeps its own


def test_the_cap_goes_where_each_format_reads_it() -> None:
    chat = {"model": "m", "messages": []}
    assert with_output_limit(WireFormat.OPENAI_CHAT, chat, 7)["max_completion_tokens"] == 7
    both = {**chat, "max_tokens": 900, "max_completion_tokens": 800}
    assert with_output_limit(WireFormat.OPENAI_CHAT, both, 7) == {
        **chat,
        "max_tokens": 7,
        "max_completion_tokens": 7,
    }
    legacy = with_output_limit(WireFormat.OPENAI_CHAT, {**chat, "max_tokens": 900}, 7)
    assert (legacy["max_tokens"], "max_completion_tokens" in legacy) == (7, False)
    assert with_output_limit(WireFormat.ANTHROPIC_MESSAGES, {"max_tokens": 9}, 7) == {
        "max_tokens": 7
    }
    assert with_output_limit(WireFormat.OPENAI_RESPONSES, {}, 7) == {"max_output_tokens": 7}
    assert WireFormat.OPENAI_EMBEDDINGS not in FITTED_FORMATS
    with pytest.raises(ConfigurationError, match="no output cap"):
        with_output_limit(WireFormat.OPENAI_EMBEDDINGS, {}, 7)


def test_an_anthropic_thinking_budget_stays_below_the_fitted_cap() -> None:
    """Anthropic refuses ``thinking.budget_tokens`` ≥ ``max_tokens`` (400): a fitted cap
    at or below the client's thinking budget lowers that budget too, not the answer."""
    body = {"max_tokens": 16_000, "thinking": {"type": "enabled", "budget_tokens": 10_000}}
    fitted = with_output_limit(WireFormat.ANTHROPIC_MESSAGES, body, 3000)
    assert fitted == {"max_tokens": 3000, "thinking": {"type": "enabled", "budget_tokens": 2999}}
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 10_000}  # not mutated
    roomy = with_output_limit(WireFormat.ANTHROPIC_MESSAGES, body, 12_000)
    assert roomy["thinking"] == {"type": "enabled", "budget_tokens": 10_000}
    off = {"max_tokens": 9, "thinking": {"type": "disabled"}}
    assert with_output_limit(WireFormat.ANTHROPIC_MESSAGES, off, 7)["thinking"] == {
        "type": "disabled"
    }


def test_extended_thinking_is_never_fitted_below_its_least_budget() -> None:
    """A fitted cap lowers ``budget_tokens`` under it; Anthropic refuses a budget under
    1,024, so a request with thinking enabled is fitted no lower than 1,025."""
    thinking = {"max_tokens": 16_000, "thinking": {"type": "enabled", "budget_tokens": 4000}}
    anthropic = WireFormat.ANTHROPIC_MESSAGES
    assert least_fitted_tokens(anthropic, thinking, 256) == 1025
    assert least_fitted_tokens(anthropic, thinking, 2000) == 2000
    assert least_fitted_tokens(anthropic, {"thinking": {"type": "disabled"}}, 256) == 256
    assert least_fitted_tokens(anthropic, {"max_tokens": 9}, 256) == 256
    assert least_fitted_tokens(WireFormat.OPENAI_CHAT, thinking, 256) == 256
    fitted = with_output_limit(anthropic, thinking, 1025)
    assert fitted["thinking"]["budget_tokens"] == 1024
