"""Prices and costs: exact for any token counts and prices with up to 6 decimals."""

from __future__ import annotations

import json
from decimal import ROUND_CEILING, Decimal, localcontext
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewaykit.errors import ConfigurationError, InvalidAmountError
from gatewaykit.money import MAX_NANOS, from_nanos, to_nanos
from gatewaykit.pricing import (
    DEFAULT_PRICES,
    DEFAULT_PRICES_DATE,
    ModelPrice,
    PriceTable,
    estimate_cost,
    estimate_prompt_tokens,
)
from gatewaykit.usage import Usage

# A price with up to 6 decimals, as integer micro-USD per million tokens.
micro_prices = st.integers(min_value=0, max_value=1_000 * 10**6)
tokens = st.integers(min_value=0, max_value=10**9)


def price_of(micro: int) -> Decimal:
    return Decimal(micro).scaleb(-6)


def expected_nanos(counts: list[int], micros: list[int]) -> int:
    """Independent integer arithmetic: Σ tokens × µUSD/Mtok is in 10⁻¹² USD; ceil to 10⁻⁹."""
    pico = sum(t * m for t, m in zip(counts, micros, strict=True))
    return -(-pico // 1000)


@given(st.lists(tokens, min_size=4, max_size=4), st.lists(micro_prices, min_size=4, max_size=4))
def test_cost_is_exact(counts: list[int], micros: list[int]) -> None:
    price = ModelPrice(*(price_of(m) for m in micros))
    usage = Usage(counts[0], counts[1], counts[2], counts[3])
    assert price.cost_nanos(usage) == expected_nanos(counts, micros)
    assert price.cost(usage) == from_nanos(expected_nanos(counts, micros))


@given(tokens, tokens, micro_prices, micro_prices)
def test_cache_prices_default_to_input(inp: int, out: int, pin: int, pout: int) -> None:
    price = ModelPrice(price_of(pin), price_of(pout))
    usage = Usage(inp, out, cache_read_tokens=inp, cache_write_tokens=out)
    assert price.cost_nanos(usage) == expected_nanos([inp, out, inp, out], [pin, pout, pin, pin])


@given(tokens, tokens, micro_prices, micro_prices)
def test_estimate_holds_at_least_the_cost(prompt: int, output: int, pin: int, pout: int) -> None:
    price = ModelPrice(price_of(pin), price_of(pout), price_of(pin // 2), price_of(pin * 2))
    estimate = estimate_cost(price, prompt_tokens=prompt, max_output_tokens=output)
    for usage in (
        Usage(prompt, output),
        Usage(0, output, cache_read_tokens=prompt),
        Usage(0, output, cache_write_tokens=prompt),
    ):
        assert estimate >= price.cost(usage)


def test_rounds_up_once_not_per_kind() -> None:
    price = ModelPrice(Decimal("0.000001"), Decimal("0.000001"))
    # 1 token at 10⁻⁶ $/Mtok is 10⁻¹² $: each kind alone would round up to 1 nano.
    assert price.cost_nanos(Usage(1, 1, 1, 1)) == 1
    assert price.cost_nanos(Usage(0, 0)) == 0


def test_floats_rejected_in_prices() -> None:
    with pytest.raises(InvalidAmountError):
        ModelPrice(2.5, Decimal(10))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        PriceTable({"m": {"input_per_mtok": 2.5, "output_per_mtok": "1"}})
    with pytest.raises(InvalidAmountError):
        ModelPrice(Decimal(-1), Decimal(1))


def test_price_table_lookup() -> None:
    table = PriceTable(
        {
            "gpt-4o": {"input_per_mtok": "2.50", "output_per_mtok": "10.00"},
            "anthropic/claude-x": {"input_per_mtok": "3", "output_per_mtok": "15"},
        }
    )
    assert table.lookup("gpt-4o") == ModelPrice(Decimal("2.5"), Decimal(10))
    assert table.lookup("openai/gpt-4o") == table["gpt-4o"]  # provider/model sent by client
    assert table.lookup("claude-x", provider="anthropic") == table["anthropic/claude-x"]
    assert table.lookup("claude-x") is None
    assert table.lookup("unknown") is None
    assert len(table) == 2
    assert set(table) == {"gpt-4o", "anthropic/claude-x"}
    merged = table.merged({"gpt-4o": ModelPrice(Decimal(1), Decimal(1))})
    assert merged["gpt-4o"].input_per_mtok == 1
    assert table["gpt-4o"].input_per_mtok == Decimal("2.5")


def test_price_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "gpt-4o": {
                    "input_per_mtok": "2.50",
                    "output_per_mtok": "10.00",
                    "cache_read_per_mtok": "1.25",
                    "cache_write_per_mtok": "3.125",
                }
            }
        )
    )
    price = PriceTable.from_file(path)["gpt-4o"]
    assert (price.cache_read, price.cache_write) == (Decimal("1.25"), Decimal("3.125"))
    # JSON numbers are parsed as Decimal, never through float.
    path.write_text('{"m": {"input_per_mtok": 0.1, "output_per_mtok": 0.3}}')
    assert PriceTable.from_file(path)["m"].input_per_mtok == Decimal("0.1")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "the price file is not a JSON object"),
        ('{"m": 1}', "m is not a JSON object"),
        (
            '{"": {"input_per_mtok": "1", "output_per_mtok": "1"}}',
            r"\[key\]: String should have at least 1 character",
        ),
        ('{"m": {"input_per_mtok": "1"}}', "m.output_per_mtok is missing"),
        (
            '{"m": {"input_per_mtok": "1", "output_per_mtok": "x"}}',
            "m.output_per_mtok: .*not a decimal amount",
        ),
        (
            '{"m": {"input_per_mtok": "1", "output_per_mtok": "1", "extra": "1"}}',
            "m.extra: Extra inputs are not permitted",
        ),
        ('{"m": {"input_per_mtok": "-1", "output_per_mtok": "1"}}', "m.input_per_mtok: .*negative"),
        (
            '{"m": {"input_per_mtok": "1", "output_per_mtok": "1", "context_window": "8"}}',
            "m.context_window: Input should be a valid integer",
        ),
        (
            '{"m": {"input_per_mtok": "1", "output_per_mtok": "1", "context_window": 0}}',
            "m.context_window: Input should be greater than or equal to 1",
        ),
        (
            '{"m": {"input_per_mtok": "1", "output_per_mtok": "1", "context_window": 1.5}}',
            "m.context_window: Input should be a valid integer",
        ),
        (
            '{"m": {"input_per_mtok": "1", "output_per_mtok": "1", "context_window": true}}',
            "m.context_window: Input should be a valid integer",
        ),
    ],
)
def test_bad_price_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        PriceTable.from_file(path)


def test_context_window(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        '{"m": {"input_per_mtok": "1", "output_per_mtok": "2", "context_window": 32768},'
        ' "n": {"input_per_mtok": "1", "output_per_mtok": "2"}}'
    )
    table = PriceTable.from_file(path)
    assert table["m"].context_window == 32768
    assert table["n"].context_window is None
    assert ModelPrice(Decimal(1), Decimal(2), context_window=10).context_window == 10
    for bad in (0, -1, True, 1.0, "10"):
        with pytest.raises(ConfigurationError, match="context_window"):
            ModelPrice(Decimal(1), Decimal(2), context_window=bad)  # type: ignore[arg-type]


def test_missing_price_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read"):
        PriceTable.from_file(tmp_path / "nope.json")


def test_default_table() -> None:
    table = PriceTable.default()
    assert len(table) == len(DEFAULT_PRICES) > 5
    assert DEFAULT_PRICES_DATE.count("-") == 2
    assert table.lookup("gpt-4o") is not None
    # Every default model has its published context window.
    assert all(price.context_window for price in DEFAULT_PRICES.values())
    assert table["gpt-4o"].context_window == 128_000
    assert table["gpt-4.1"].context_window == 1_047_576


def test_prompt_estimate() -> None:
    assert estimate_prompt_tokens(0) == 0
    assert estimate_prompt_tokens(-5) == 0
    assert estimate_prompt_tokens(1) == 1
    assert estimate_prompt_tokens(8) == 2
    assert estimate_prompt_tokens(9) == 3


@given(
    rates=st.lists(
        st.sampled_from([0, 2, 9, 15, 20]).flatmap(
            lambda places: st.decimals(min_value=0, max_value=100_000, places=places)
        ),
        min_size=4,
        max_size=4,
    ),
    counts=st.lists(st.integers(min_value=0, max_value=10**12), min_size=4, max_size=4),
    prompt=st.integers(min_value=0, max_value=10**9),
    output=st.integers(min_value=0, max_value=10**9),
)
def test_integer_costs_equal_decimal_costs(
    rates: list[Decimal], counts: list[int], prompt: int, output: int
) -> None:
    """The integer fast path computes exactly what 80-digit Decimal arithmetic does."""
    price = ModelPrice(*rates)
    usage = Usage(counts[0], counts[1], counts[2], counts[3])
    with localcontext() as ctx:
        ctx.prec = 80
        exact = (
            counts[0] * price.input_per_mtok
            + counts[1] * price.output_per_mtok
            + counts[2] * price.cache_read
            + counts[3] * price.cache_write
        )
        expected = (exact / 1_000_000 * 10**9).to_integral_value(rounding=ROUND_CEILING)
    if expected > MAX_NANOS:
        with pytest.raises(InvalidAmountError):
            price.cost_nanos(usage)
    else:
        assert price.cost_nanos(usage) == int(expected)
    with localcontext() as ctx:
        ctx.prec = 80
        hold = (prompt * price.dearest_input + output * price.output_per_mtok) / 1_000_000
        expected_hold = (hold * 10**9).to_integral_value(rounding=ROUND_CEILING)
    if expected_hold <= MAX_NANOS:
        assert to_nanos(
            estimate_cost(price, prompt_tokens=prompt, max_output_tokens=output)
        ) == int(expected_hold)
