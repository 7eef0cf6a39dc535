"""Exact money: ``Decimal`` USD at the API, integer nano-USD in storage.

A float never reaches a money path: it is rejected here, at the boundary. Conversion to
nano-USD rounds up (ceiling), once, so a budget is never under-charged.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from gatewaykit.errors import InvalidAmountError

__all__ = ["NANOS_PER_USD", "from_nanos", "parse_plain_usd", "parse_usd", "to_nanos"]

NANOS_PER_USD = 10**9
#: Largest amount a signed 64-bit nano-USD counter holds (about $9.2 billion).
MAX_NANOS = 2**63 - 1
#: Decimal exponents (of the leading digit) an amount may have: prices per million tokens
#: far below a nano-USD, budgets far beyond any ledger, but nothing absurd.
_MIN_EXPONENT = -30
_MAX_EXPONENT = 18


def parse_usd(value: object) -> Decimal:
    """Validate an amount of USD: a finite, non-negative ``Decimal``, ``int`` or string.

    Floats are refused because they cannot represent most cents exactly.
    """
    if isinstance(value, (bool, float)):
        raise InvalidAmountError(
            f"money must be a Decimal, int or decimal string, not {type(value).__name__} "
            f"({value!r}); write Decimal('{value}') instead"
        )
    if isinstance(value, Decimal):
        amount = value
    elif isinstance(value, int):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise InvalidAmountError(
                f"{value!r} is not a decimal amount of USD (e.g. '12.50')"
            ) from None
    else:
        raise InvalidAmountError(
            f"money must be a Decimal, int or decimal string, not {type(value).__name__}"
        )
    if not amount.is_finite():
        raise InvalidAmountError(f"money must be finite, got {amount}")
    if amount < 0:
        raise InvalidAmountError(f"money must not be negative, got {amount}")
    if amount and not _MIN_EXPONENT <= amount.adjusted() <= _MAX_EXPONENT:
        # Arithmetic on its digits would then cost time and memory without bound (an
        # exponent of a million is a short string); no price or budget is near these.
        raise InvalidAmountError(
            f"money must be 0 or between 1E{_MIN_EXPONENT} and 1E{_MAX_EXPONENT + 1} USD, "
            f"got {amount:.3E}"
        )
    return amount


_PLAIN = re.compile(r"[0-9]*\.?[0-9]+")


def parse_plain_usd(text: str) -> Decimal:
    """An amount of USD a person typed: digits with an optional decimal point, nothing else.

    ``Decimal`` reads ``1e3`` as 1000 and ``1_000`` as 1000; typed at a prompt, those are
    more likely mistakes than budgets, so human input (the command line) must spell the
    amount out.
    """
    plain = text.strip()
    if not _PLAIN.fullmatch(plain):
        raise InvalidAmountError(
            f"{text!r} is not a plain amount of USD: write digits with an optional decimal "
            "point, e.g. 1000 or 0.25 (no exponent, sign, currency symbol or separators)"
        )
    return parse_usd(plain)


def to_nanos(value: object) -> int:
    """USD → integer nano-USD, rounded up to the next nano-USD.

    Integer arithmetic on the Decimal's digits: exact at any size, and no decimal
    context to enter (which costs more than the rest of a request's money arithmetic).
    """
    amount = parse_usd(value)
    _, digits, exponent = amount.as_tuple()
    assert isinstance(exponent, int)  # parse_usd refused NaN and infinities
    coefficient = int("".join(map(str, digits))) if digits else 0
    if not coefficient:
        return 0  # zero, whatever its exponent ("0E+999999999")
    shift = exponent + 9
    # Beyond nine decimal places the ceiling: never under-charge.
    nanos: int = coefficient * 10**shift if shift >= 0 else -(-coefficient // 10 ** (-shift))
    if nanos > MAX_NANOS:
        raise InvalidAmountError(f"amount {amount} USD is larger than a ledger can hold")
    return nanos


def from_nanos(nanos: int) -> Decimal:
    """Integer nano-USD → ``Decimal`` USD, exact and normalised (no trailing zeros)."""
    if isinstance(nanos, bool) or not isinstance(nanos, int):
        raise InvalidAmountError(f"nano-USD must be an int, got {type(nanos).__name__}")
    # Built from its decimal digits (exact in any context), trailing zeros dropped:
    # whole amounts stay integers ("5", not "5E+0"), fractions are normalised ("0.0042").
    sign = "-" if nanos < 0 else ""
    whole, fraction = divmod(abs(nanos), NANOS_PER_USD)
    if not fraction:
        return Decimal(f"{sign}{whole}")
    return Decimal(f"{sign}{whole}.{fraction:09d}".rstrip("0"))
