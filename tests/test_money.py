"""Money is exact: Decimal at the API, integer nano-USD in storage, rounded up once."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewaykit.errors import ConfigurationError, GatewayKitError, InvalidAmountError
from gatewaykit.money import (
    MAX_NANOS,
    NANOS_PER_USD,
    from_nanos,
    parse_plain_usd,
    parse_usd,
    to_nanos,
)
from gatewaykit.pricing import ModelPrice
from gatewaykit.usage import Usage

amounts = st.decimals(min_value=0, max_value=10**9, places=12, allow_nan=False)


def ceil_nanos(value: Decimal) -> int:
    """An independent integer computation of ceil(value × 10⁹)."""
    sign, digits, exponent = value.as_tuple()
    assert sign == 0
    assert isinstance(exponent, int)
    numerator: int = int("".join(map(str, digits)) or "0") * 10**9
    if exponent >= 0:
        scaled: int = numerator * pow(10, exponent)
        return scaled
    denominator: int = pow(10, -exponent)
    return -(-numerator // denominator)


@given(amounts)
def test_to_nanos_rounds_up_exactly_once(value: Decimal) -> None:
    nanos = to_nanos(value)
    assert nanos == ceil_nanos(value)
    assert from_nanos(nanos) >= value
    assert from_nanos(nanos) - value < Decimal(1) / NANOS_PER_USD


@given(st.integers(min_value=0, max_value=MAX_NANOS))
def test_nanos_round_trip(nanos: int) -> None:
    assert to_nanos(from_nanos(nanos)) == nanos


@given(st.integers(min_value=0, max_value=10**15))
def test_from_nanos_is_exact_and_normalised(nanos: int) -> None:
    value = from_nanos(nanos)
    assert value * NANOS_PER_USD == nanos
    assert value == value.normalize()
    text = format(value, "f")  # how amounts are shown: no exponent
    assert "E" not in text.upper()
    assert Decimal(text) == value


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_are_refused(value: float) -> None:
    with pytest.raises(InvalidAmountError, match="Decimal"):
        parse_usd(value)
    with pytest.raises(InvalidAmountError):
        to_nanos(value)


@pytest.mark.parametrize(
    "value",
    [
        Decimal(-1),
        Decimal("-0.000000001"),
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        "-1",
        "nan",
        "1e",
        "",
        "12,50",
        True,
        None,
        [1],
        b"1",
    ],
    ids=repr,
)
def test_bad_amounts(value: object) -> None:
    with pytest.raises(InvalidAmountError) as info:
        parse_usd(value)
    assert isinstance(info.value, ConfigurationError)
    assert isinstance(info.value, GatewayKitError)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("12.50", Decimal("12.50")), (" 3 ", Decimal(3)), (7, Decimal(7)), (Decimal("0"), 0)],
)
def test_good_amounts(value: object, expected: Decimal) -> None:
    assert parse_usd(value) == expected


def test_too_large_and_non_int_nanos() -> None:
    with pytest.raises(InvalidAmountError, match="larger"):
        to_nanos(Decimal(MAX_NANOS) / NANOS_PER_USD + 1)
    with pytest.raises(InvalidAmountError):
        from_nanos(1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidAmountError):
        from_nanos(True)


@pytest.mark.parametrize("text", ["1E+10000000", "1E-10000000", "1E+999999999", "1E+19"])
def test_absurd_exponents_are_refused_at_once(text: str) -> None:
    """An exponent of a million is a short string; computing with it used to hang."""
    with pytest.raises(InvalidAmountError, match="between"):
        to_nanos(text)


def test_zero_with_any_exponent_is_zero() -> None:
    assert to_nanos("0E+999999999") == 0
    assert ModelPrice(Decimal("0E+999999999"), Decimal(1)).cost_nanos(Usage(input_tokens=5)) == 0


@pytest.mark.parametrize(
    "text", ["1e3", "1E-3", "1_000", "+5", "-5", "$5", "5.", "NaN", "Infinity", ""]
)
def test_typed_money_must_be_plain(text: str) -> None:
    with pytest.raises(InvalidAmountError, match="plain amount"):
        parse_plain_usd(text)


@pytest.mark.parametrize(("text", "expected"), [("1000", "1000"), ("0.25", "0.25"), (".5", "0.5")])
def test_plain_money_is_read_exactly(text: str, expected: str) -> None:
    assert parse_plain_usd(text) == Decimal(expected)
