"""StandaloneMode's routes: which configured upstreams serve a model, and at what price.

Both follow from configuration alone (the upstreams, the price table and the
``unpriced`` policy), so a model's route is worked out once and remembered.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from decimal import Decimal
from typing import Literal

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ConfigurationError, ErrorKind, RequestRejected
from gatewaykit.listing import ListedModel
from gatewaykit.modes.admission import PROVIDERS
from gatewaykit.money import parse_usd
from gatewaykit.pricing import ModelPrice, PriceTable
from gatewaykit.upstream import Attempt, Upstream

__all__ = ["RouteTable", "UnpricedPolicy"]

#: ``"reject"`` (400), ``"allow"`` (served unbudgeted: held and charged 0), or a fallback
#: price: a :class:`ModelPrice`, or a ``Decimal`` USD per million tokens for input and
#: output alike.
UnpricedPolicy = Literal["reject", "allow"] | ModelPrice | Decimal

_ROUTE_CACHE_SIZE = 10_000


class RouteTable:
    """The attempts and the price of a model in a wire format, from configuration."""

    def __init__(
        self,
        *,
        prices: PriceTable | Mapping[str, ModelPrice],
        upstreams: Sequence[Upstream],
        unpriced: UnpricedPolicy,
    ) -> None:
        if isinstance(upstreams, Upstream) or not all(isinstance(u, Upstream) for u in upstreams):
            raise ConfigurationError("upstreams must be a sequence of Upstream")
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self.upstreams = tuple(upstreams)
        self.unpriced_price = _unpriced_price(unpriced)
        self.unpriced: Literal["reject", "allow", "fallback"] = (
            "reject" if unpriced == "reject" else "allow" if unpriced == "allow" else "fallback"
        )
        self._routes: dict[
            tuple[WireFormat | None, str], tuple[tuple[Attempt, ...], ModelPrice | None]
        ] = {}

    def attempts(self, fmt: WireFormat | None, model: str) -> tuple[Attempt, ...]:
        """The attempts alone, unpriced (for a request that is never charged)."""
        return tuple(
            Attempt(attempt_id=str(n), upstream=u, model=model)
            for n, u in enumerate(self._upstreams(fmt, model), start=1)
        )

    def route(
        self, fmt: WireFormat | None, model: str
    ) -> tuple[tuple[Attempt, ...], ModelPrice | None]:
        """The attempts (every configured upstream that serves ``model`` in ``fmt``, in
        order: the adapters fall back along them) and the price; remembered per model,
        since both follow from configuration alone."""
        key = (fmt, model)
        route = self._routes.get(key)
        if route is None:
            serving = self._upstreams(fmt, model)
            price = self._price(model, serving[0] if serving else None)
            attempts = tuple(
                Attempt(attempt_id=str(n), upstream=u, model=model)
                for n, u in enumerate(serving, start=1)
            )
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.clear()
            route = self._routes[key] = (attempts, price)
        return route

    def listed_models(
        self, provider: Literal["openai", "anthropic"], allowed: Collection[str] | None
    ) -> list[ListedModel]:
        """The models a request through ``provider``'s upstreams would be admitted for
        (in ``allowed``, when it is not None), in price-table order; see
        ``StandaloneMode.list_models``."""
        upstreams = [u for u in self.upstreams if u.provider == provider]
        candidates = dict.fromkeys(self.prices)
        for upstream in upstreams:
            candidates.update(dict.fromkeys(sorted(upstream.models or ())))
        candidates.update(dict.fromkeys(sorted(allowed or ())))
        listed = []
        for model in candidates:
            if allowed is not None and model not in allowed:
                continue
            serving = next((u for u in upstreams if u.serves(model)), None)
            if serving is None:
                continue
            if self.unpriced == "reject" and self.prices.lookup(model, provider) is None:
                continue
            listed.append(ListedModel(id=model, owned_by=serving.label))
        return listed

    def _upstreams(self, fmt: WireFormat | None, model: str) -> list[Upstream]:
        """The configured upstreams that serve ``model`` in ``fmt``, in order (fallbacks)."""
        provider = PROVIDERS.get(fmt) if fmt is not None else None
        return [
            upstream
            for upstream in self.upstreams
            if (provider is None or upstream.provider == provider) and upstream.serves(model)
        ]

    def _price(self, model: str, upstream: Upstream | None) -> ModelPrice | None:
        """The price to hold and charge at; None means unbudgeted (``allow``)."""
        price = self.prices.lookup(model, upstream.provider if upstream else None)
        if price is not None:
            return price
        if self.unpriced == "reject":
            raise RequestRejected(
                ErrorKind.NOT_PRICED,
                f"model {model!r} has no price configured on this gateway",
            )
        return self.unpriced_price


def _unpriced_price(policy: object) -> ModelPrice | None:
    if policy in ("reject", "allow"):
        return None
    if isinstance(policy, ModelPrice):
        return policy
    if isinstance(policy, Decimal):
        rate = parse_usd(policy)
        return ModelPrice(input_per_mtok=rate, output_per_mtok=rate)
    raise ConfigurationError(
        "unpriced must be 'reject', 'allow', a ModelPrice or a Decimal USD per million tokens, "
        f"not {policy!r}"
    )
