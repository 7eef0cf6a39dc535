"""Model prices and the cost of a request, exact to the nano-USD.

Prices are USD per million tokens. A cost is computed exactly in ``Decimal`` and rounded
up to the next nano-USD once (:func:`gatewaykit.money.to_nanos`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, TypeAdapter, ValidationError

from gatewaykit.errors import ConfigurationError, InvalidAmountError
from gatewaykit.money import MAX_NANOS, from_nanos, parse_usd, to_nanos
from gatewaykit.usage import Usage
from gatewaykit.validation import first_problem

__all__ = [
    "DEFAULT_PRICES",
    "DEFAULT_PRICES_DATE",
    "ModelPrice",
    "PriceTable",
    "estimate_cost",
    "estimate_prompt_tokens",
]

_MTOK = Decimal(1_000_000)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens. Cache prices default to the input price when not given.

    ``context_window`` is the model's context window in tokens (None: not known): the
    most prompt tokens one request can be billed for. It bounds the hold of an OpenAI
    responses request that continues a stored response the gateway does not know
    (docs/adapters.md, "Stored context").
    """

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cache_read_per_mtok: Decimal | None = None
    cache_write_per_mtok: Decimal | None = None
    context_window: int | None = dataclasses.field(default=None, kw_only=True)
    #: The four rates as integers of _UNIT USD per million tokens, when every rate is
    #: that exact (None otherwise): costs are then integer arithmetic, exactly as Decimal
    #: would compute them, at a fraction of the cost on the request path.
    _rates: tuple[int, int, int, int] | None = dataclasses.field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        window = self.context_window
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ConfigurationError(
                f"ModelPrice.context_window must be a positive int of tokens, not {window!r}"
            )
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or field.name == "context_window":
                continue
            try:
                object.__setattr__(self, field.name, parse_usd(value))
            except InvalidAmountError as exc:
                raise InvalidAmountError(f"ModelPrice.{field.name}: {exc}") from None
        object.__setattr__(self, "_rates", _integer_rates(self))

    @property
    def cache_read(self) -> Decimal:
        return self.input_per_mtok if self.cache_read_per_mtok is None else self.cache_read_per_mtok

    @property
    def cache_write(self) -> Decimal:
        if self.cache_write_per_mtok is None:
            return self.input_per_mtok
        return self.cache_write_per_mtok

    @property
    def dearest_input(self) -> Decimal:
        """The highest rate a prompt token could be billed at (for estimates)."""
        return max(self.input_per_mtok, self.cache_read, self.cache_write)

    def cost(self, usage: Usage) -> Decimal:
        """Exact cost of ``usage`` in USD, rounded up to the nano-USD."""
        return from_nanos(self.cost_nanos(usage))

    def cost_nanos(self, usage: Usage) -> int:
        """Exact cost of ``usage`` in nano-USD, rounded up once."""
        rates = self._rates
        if rates is not None:
            units = (
                usage.input_tokens * rates[0]
                + usage.output_tokens * rates[1]
                + usage.cache_read_tokens * rates[2]
                + usage.cache_write_tokens * rates[3]
            )
            nanos = -(-units // _UNITS_PER_NANO_MTOK)  # ceiling division
            if nanos > MAX_NANOS:
                raise InvalidAmountError(
                    f"cost of {usage.total_tokens} tokens is larger than a ledger can hold"
                )
            return nanos
        with localcontext() as ctx:
            ctx.prec = 80
            total = (
                usage.input_tokens * self.input_per_mtok
                + usage.output_tokens * self.output_per_mtok
                + usage.cache_read_tokens * self.cache_read
                + usage.cache_write_tokens * self.cache_write
            ) / _MTOK
        return to_nanos(total)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, model: str = "?") -> ModelPrice:
        """Build from the price-file shape: ``{"input_per_mtok": "2.50", ...}``.

        ``context_window`` (optional) is an integer number of tokens, not a string.
        """
        try:
            entry = _PRICE_ENTRY.validate_python(data)
        except ValidationError as exc:
            raise ConfigurationError(
                f"price of {model!r}: {first_problem(exc, whole='the price')}"
            ) from None
        return entry.price()


_Usd = Annotated[Decimal, PlainValidator(parse_usd)]


class _PriceEntry(BaseModel):
    """One model's entry in a price file (docs/configuration.md): decimal strings only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_per_mtok: _Usd
    output_per_mtok: _Usd
    cache_read_per_mtok: _Usd | None = None
    cache_write_per_mtok: _Usd | None = None
    context_window: Annotated[int, Field(strict=True, ge=1)] | None = None

    def price(self) -> ModelPrice:
        return ModelPrice(
            self.input_per_mtok,
            self.output_per_mtok,
            self.cache_read_per_mtok,
            self.cache_write_per_mtok,
            context_window=self.context_window,
        )


_PRICE_ENTRY = TypeAdapter(_PriceEntry)
_PRICE_FILE = TypeAdapter(dict[Annotated[str, Field(min_length=1)], _PriceEntry])


class PriceTable(Mapping[str, ModelPrice]):
    """Prices by model name as the client sends it; ``provider/model`` keys also match."""

    def __init__(self, prices: Mapping[str, ModelPrice | Mapping[str, Any]] | None = None) -> None:
        self._prices: dict[str, ModelPrice] = {}
        for name, price in (prices or {}).items():
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"price table keys must be model names, got {name!r}")
            self._prices[name] = (
                price if isinstance(price, ModelPrice) else ModelPrice.from_json(price, model=name)
            )

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """Load the JSON price file (docs/mounting.md, Prices): rates as decimal strings."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigurationError(f"cannot read price file {path}: {exc.strerror}") from None
        try:
            # JSON numbers become Decimal, never float: a price is exact as written.
            entries = _PRICE_FILE.validate_python(json.loads(text, parse_float=Decimal))
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"price file {path} is not valid JSON: {exc}") from None
        except ValidationError as exc:
            problem = first_problem(exc, whole="the price file")
            raise ConfigurationError(f"price file {path}: {problem}") from None
        return cls({name: entry.price() for name, entry in entries.items()})

    @classmethod
    def default(cls) -> PriceTable:
        """A table of common models' list prices (see ``DEFAULT_PRICES_DATE``)."""
        return cls(DEFAULT_PRICES)

    def lookup(self, model: str, provider: str | None = None) -> ModelPrice | None:
        """The price for ``model`` as sent, else ``provider/model``, else the bare name."""
        if model in self._prices:
            return self._prices[model]
        if provider is not None and f"{provider}/{model}" in self._prices:
            return self._prices[f"{provider}/{model}"]
        if "/" in model:
            return self._prices.get(model.split("/", 1)[1])
        return None

    def merged(self, other: Mapping[str, ModelPrice]) -> PriceTable:
        """A new table with ``other``'s prices taking precedence."""
        return PriceTable({**self._prices, **other})

    def __getitem__(self, model: str) -> ModelPrice:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def __repr__(self) -> str:
        return f"PriceTable({len(self._prices)} models)"


def estimate_prompt_tokens(chars: int) -> int:
    """Prompt tokens ≈ ceil(chars / 4): cheap, deterministic, and errs high for English."""
    return math.ceil(max(chars, 0) / 4)


def estimate_cost(price: ModelPrice, *, prompt_tokens: int, max_output_tokens: int) -> Decimal:
    """The amount to hold: every prompt token at the dearest input rate, plus max output."""
    rates = price._rates
    if rates is not None:
        units = prompt_tokens * max(rates[0], rates[2], rates[3]) + max_output_tokens * rates[1]
        nanos = -(-units // _UNITS_PER_NANO_MTOK)
        if nanos > MAX_NANOS:
            raise InvalidAmountError("the estimate is larger than a ledger can hold")
        return from_nanos(nanos)
    with localcontext() as ctx:
        ctx.prec = 80
        total = (
            prompt_tokens * price.dearest_input + max_output_tokens * price.output_per_mtok
        ) / _MTOK
    return from_nanos(to_nanos(total))


#: Integer rates are kept in 10^-15 USD per million tokens, exact for every price with up
#: to 15 decimal places. tokens × rate is then in 10^-21 USD, so a cost in those units
#: divided by 10^12 (rounded up) is nano-USD.
_RATE_SCALE = 10**15
_UNITS_PER_NANO_MTOK = 10**12


def _integer_rates(price: ModelPrice) -> tuple[int, int, int, int] | None:
    rates = []
    for rate in (price.input_per_mtok, price.output_per_mtok, price.cache_read, price.cache_write):
        _, digits, exponent = rate.as_tuple()
        assert isinstance(exponent, int)  # parse_usd refused NaN and infinities
        coefficient = int("".join(map(str, digits))) if digits else 0
        shift = exponent + 15
        if not coefficient:
            rates.append(0)  # zero, whatever its exponent
            continue
        if shift < 0 and coefficient % 10**-shift:
            return None  # finer than 10^-15 USD per million tokens: Decimal arithmetic
        rates.append(coefficient * 10**shift if shift >= 0 else coefficient // 10**-shift)
    return rates[0], rates[1], rates[2], rates[3]


#: The date the default prices (and context windows) were read from the providers'
#: public price and model pages.
DEFAULT_PRICES_DATE = "2026-11-01"


def _price(
    inp: str, out: str, cache_read: str, cache_write: str | None = None, *, window: int
) -> ModelPrice:
    return ModelPrice(
        Decimal(inp),
        Decimal(out),
        Decimal(cache_read),
        None if cache_write is None else Decimal(cache_write),
        context_window=window,
    )


# Context windows as published (OpenAI's model pages, Anthropic's models overview). The
# Claude windows are the standard 200K; Sonnet's 1M-token beta needs a price-file entry.
DEFAULT_PRICES: dict[str, ModelPrice] = {
    "gpt-4o": _price("2.50", "10.00", "1.25", window=128_000),
    "gpt-4o-mini": _price("0.15", "0.60", "0.075", window=128_000),
    "gpt-4.1": _price("2.00", "8.00", "0.50", window=1_047_576),
    "gpt-4.1-mini": _price("0.40", "1.60", "0.10", window=1_047_576),
    "gpt-4.1-nano": _price("0.10", "0.40", "0.025", window=1_047_576),
    "o3": _price("2.00", "8.00", "0.50", window=200_000),
    "o4-mini": _price("1.10", "4.40", "0.275", window=200_000),
    "claude-opus-4-1": _price("15.00", "75.00", "1.50", "18.75", window=200_000),
    "claude-sonnet-4-5": _price("3.00", "15.00", "0.30", "3.75", window=200_000),
    "claude-haiku-4-5": _price("1.00", "5.00", "0.10", "1.25", window=200_000),
    "claude-3-5-haiku-latest": _price("0.80", "4.00", "0.08", "1.00", window=200_000),
    # Embedding models bill input only (their output price is 0); the window is the most
    # tokens one input may hold.
    "text-embedding-3-small": _price("0.02", "0", "0.02", window=8191),
    "text-embedding-3-large": _price("0.13", "0", "0.13", window=8191),
    "text-embedding-ada-002": _price("0.10", "0", "0.10", window=8191),
}
