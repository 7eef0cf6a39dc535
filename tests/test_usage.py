"""Usage values and the clamp that keeps absurd provider reports storable."""

from __future__ import annotations

from decimal import Decimal

from gatewaykit.money import MAX_NANOS
from gatewaykit.pricing import ModelPrice
from gatewaykit.usage import MAX_TOKENS, Usage, UsageSource, clamp_usage


def test_clamp_usage_leaves_sane_usage_alone() -> None:
    usage = Usage(MAX_TOKENS, 5, 0, MAX_TOKENS, UsageSource.PARTIAL)
    assert clamp_usage(usage) == (usage, None)
    assert clamp_usage(usage)[0] is usage


def test_clamp_usage_caps_each_kind_and_says_why() -> None:
    usage = Usage(10**30, 7, MAX_TOKENS + 1, 0, UsageSource.ESTIMATED)
    clamped, note = clamp_usage(usage)
    assert clamped == Usage(MAX_TOKENS, 7, MAX_TOKENS, 0, UsageSource.ESTIMATED)
    assert note is not None
    assert f"input_tokens={10**30}" in note
    assert f"cache_read_tokens={MAX_TOKENS + 1}" in note
    assert "output_tokens" not in note


def test_clamped_usage_is_priceable_at_any_plausible_price() -> None:
    """The documented bound: all four kinds at MAX_TOKENS, at $2,300 per million tokens."""
    rate = Decimal(2300)
    cost = ModelPrice(rate, rate, rate, rate).cost(Usage(*(MAX_TOKENS,) * 4))
    assert cost * 10**9 <= MAX_NANOS
