"""The standalone charge policy, on its own: no ledger, no request."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from gatewaykit.modes.charging import charge_for
from gatewaykit.pricing import ModelPrice
from gatewaykit.settlement import RequestEstimate
from gatewaykit.usage import MAX_TOKENS, Usage, UsageSource

PRICE = ModelPrice(Decimal(1), Decimal(2))  # $1 in, $2 out per million tokens
ESTIMATE = RequestEstimate(prompt_tokens=100, max_output_tokens=1000, amount=Decimal("0.0021"))


def decide(status: Any, usage: Usage | None = None, **given: Any) -> Any:
    options: dict[str, Any] = {
        "estimate": ESTIMATE,
        "price": PRICE,
        "committed": False,
        "upstream_contacted": True,
        "output_chars": 0,
        "partial_usage": None,
        "missing_usage": "estimate",
        "disconnect": "charge_observed",
    }
    options.update(given)
    return charge_for(status, usage, None, **options)


def test_success_charges_the_reported_usage() -> None:
    charge = decide("success", Usage(input_tokens=10, output_tokens=5))
    assert (charge.amount, charge.usage.source) == (Decimal("0.00002"), UsageSource.PROVIDER)


def test_an_error_before_commit_releases_and_after_it_charges_what_was_seen() -> None:
    assert decide("error").amount is None
    after = decide("error", committed=True, output_chars=40)
    assert after.usage == Usage(input_tokens=100, output_tokens=10, source=UsageSource.ESTIMATED)
    assert after.amount == Decimal("0.00012")


@pytest.mark.parametrize(
    ("policy", "amount", "source"),
    [
        ("estimate", Decimal("0.00011"), UsageSource.ESTIMATED),  # prompt + 20 chars / 4
        ("hold", Decimal("0.0021"), UsageSource.ESTIMATED),
        ("allow_free", Decimal(0), None),
        ("fail", Decimal("0.00011"), UsageSource.ESTIMATED),
    ],
)
def test_missing_usage_follows_the_policy(
    policy: Any, amount: Decimal, source: UsageSource | None
) -> None:
    charge = decide("no_usage", missing_usage=policy, output_chars=20, committed=True)
    assert charge.amount == amount
    assert (charge.usage.source if charge.usage else None) is source
    assert (charge.error is not None) is (policy == "fail")


def test_a_disconnect_charges_partial_usage_topped_up_or_releases_by_policy() -> None:
    partial = Usage(input_tokens=50, cache_read_tokens=7, source=UsageSource.PARTIAL)
    charge = decide("incomplete", partial_usage=partial, output_chars=80, committed=True)
    assert charge.usage == Usage(
        input_tokens=50, output_tokens=20, cache_read_tokens=7, source=UsageSource.PARTIAL
    )
    assert decide("incomplete", committed=True, disconnect="release").amount is None
    assert decide("incomplete", upstream_contacted=False).amount is None  # nothing sent


def test_absurd_usage_is_clamped_and_flagged() -> None:
    charge = decide("success", Usage(input_tokens=10**30))
    assert charge.usage.input_tokens == MAX_TOKENS
    assert charge.usage.source is UsageSource.PROVIDER
    assert charge.error is not None


def test_an_unbudgeted_request_records_usage_and_charges_nothing() -> None:
    charge = decide("success", Usage(input_tokens=10), price=None)
    assert (charge.amount, charge.usage.input_tokens) == (Decimal(0), 10)
