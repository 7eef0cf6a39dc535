"""What a finished request is charged: the standalone charge policy, as a pure function.

Given how a request ended and what the settlement observed, :func:`charge_for` decides
the usage to record and the amount to settle (or that the hold is released), following
the settlement table of docs/settlement.md and the ``missing_usage`` / ``disconnect``
policies. No ledger, no I/O: it is tested on its own (tests/test_charging.py) and the
settlement only writes it down.
"""

from __future__ import annotations

import dataclasses
import math
from decimal import Decimal
from typing import Literal

from gatewaykit.errors import InvalidAmountError
from gatewaykit.pricing import ModelPrice
from gatewaykit.settlement import RequestEstimate, SettlementStatus
from gatewaykit.usage import Usage, UsageSource, clamp_usage

__all__ = ["Charge", "DisconnectPolicy", "MissingUsagePolicy", "charge_for"]

MissingUsagePolicy = Literal["estimate", "hold", "allow_free", "fail"]
DisconnectPolicy = Literal["charge_observed", "release"]

NO_USAGE_ERROR = "stream completed without usage data"


@dataclasses.dataclass(frozen=True, slots=True)
class Charge:
    """The decision: ``amount`` None releases the hold; ``usage`` None records no tokens."""

    usage: Usage | None
    amount: Decimal | None
    error: str | None


def charge_for(
    status: SettlementStatus,
    usage: Usage | None,
    error: str | None,
    *,
    estimate: RequestEstimate,
    price: ModelPrice | None,
    committed: bool,
    upstream_contacted: bool,
    output_chars: int,
    partial_usage: Usage | None,
    missing_usage: MissingUsagePolicy,
    disconnect: DisconnectPolicy,
) -> Charge:
    """The charge for a request that ended with ``status`` (see the module docstring).

    ``price`` None is an unbudgeted request: usage is recorded, nothing is charged.
    """
    charge: Usage | None
    amount: Decimal | None = None  # None: release the hold
    if status == "success":
        assert usage is not None
        charge = usage
    elif status == "no_usage":
        if missing_usage == "allow_free":
            charge = None
            amount = Decimal(0)
        elif missing_usage == "hold":
            charge = Usage(
                input_tokens=estimate.prompt_tokens,
                output_tokens=estimate.max_output_tokens,
                source=UsageSource.ESTIMATED,
            )
            amount = estimate.amount
        else:
            observed = _observed(None, estimate, upstream_contacted, output_chars, partial_usage)
            charge = observed or Usage(
                input_tokens=estimate.prompt_tokens, source=UsageSource.ESTIMATED
            )
            if charge.source is UsageSource.PARTIAL:
                charge = dataclasses.replace(charge, source=UsageSource.ESTIMATED)
            if missing_usage == "fail":
                error = NO_USAGE_ERROR
    elif status == "error" and not committed:
        charge = None  # nothing was delivered: refund
    elif disconnect == "release":
        charge = None
    else:  # incomplete, or error after commit: charge what was consumed
        charge = _observed(usage, estimate, upstream_contacted, output_chars, partial_usage)
    if charge is not None:  # an absurd report must not overflow the store
        charge, clamped = clamp_usage(charge)
        if clamped:
            error = f"{clamped} ({error})" if error else clamped
    if charge is not None and amount is None:
        try:
            amount = Decimal(0) if price is None else price.cost(charge)
        except InvalidAmountError:
            # Usage no ledger can price is a bogus report; never leave the hold live over
            # it: charge the whole hold and say why in the record.
            amount = estimate.amount
            note = "reported usage is too large to price; charged the hold"
            error = f"{note} ({error})" if error else note
    return Charge(usage=charge, amount=amount, error=error)


def _observed(
    reported: Usage | None,
    estimate: RequestEstimate,
    upstream_contacted: bool,
    output_chars: int,
    partial_usage: Usage | None,
) -> Usage | None:
    """What was consumed by a call that did not finish; None when nothing was."""
    if reported is not None and reported.source is UsageSource.PROVIDER:
        # The provider's own final totals (e.g. OpenAI's usage chunk arrived, then the
        # client left before [DONE]): charged as reported, not inflated by the estimate.
        return reported
    partial = reported or partial_usage
    output = math.ceil(output_chars / 4)
    if partial is not None:
        return Usage(
            input_tokens=partial.input_tokens,
            output_tokens=max(partial.output_tokens, output),
            cache_read_tokens=partial.cache_read_tokens,
            cache_write_tokens=partial.cache_write_tokens,
            source=UsageSource.PARTIAL,
        )
    if not upstream_contacted and output == 0:
        return None
    return Usage(
        input_tokens=estimate.prompt_tokens, output_tokens=output, source=UsageSource.ESTIMATED
    )
