"""The usage page's chart, drawn on the server: spend per day, one stacked colour per model.

Only geometry is computed here; ``templates/chart.html`` writes it out as SVG, escaped
like every other value. Floats appear only as coordinates, never as money.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import date, timedelta
from decimal import Decimal

from gatewaykit.admin.formatting import usd

__all__ = ["Bar", "Chart", "MAX_DAYS", "spend_chart"]

#: The longest range drawn, in days (a longer one shows its last MAX_DAYS days).
MAX_DAYS = 92
#: Colour-blind-safe (Okabe-Ito); the models past the palette's length share "other".
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442")
OTHER_COLOUR = "#999999"
WIDTH, HEIGHT = 800, 260
RIGHT, TOP, BOTTOM = 12, 12, 36
CHAR_WIDTH = 7  # of an 11 px label, generously: the y axis' margin fits its longest label


@dataclasses.dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str


@dataclasses.dataclass(frozen=True, slots=True)
class Tick:
    at: float
    label: str


@dataclasses.dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    left: int
    right: int
    top: int
    bottom: int
    bars: tuple[Bar, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    legend: tuple[tuple[str, str, Decimal], ...]  # model, colour, total
    first: date
    last: date

    @property
    def empty(self) -> bool:
        return not self.bars


def _nice_ceiling(value: Decimal) -> Decimal:
    """The smallest 1, 2 or 5 × 10ⁿ at or above ``value`` (for the y axis' top)."""
    if value <= 0:
        return Decimal(1)
    step = Decimal(10) ** value.adjusted()
    for factor in (1, 2, 5, 10):
        if step * factor >= value:
            return step * factor
    raise AssertionError("unreachable")  # pragma: no cover


def spend_chart(points: Iterable[tuple[date, str, Decimal]], *, first: date, last: date) -> Chart:
    """Stacked bars of cost per day from ``first`` to ``last`` (inclusive), one per model."""
    first = max(first, last - timedelta(days=MAX_DAYS - 1))
    days = (last - first).days + 1
    per_day: dict[date, dict[str, Decimal]] = {}
    totals: dict[str, Decimal] = {}
    for day, model, cost in points:
        if first <= day <= last and cost > 0:
            per_day.setdefault(day, {}).setdefault(model, Decimal(0))
            per_day[day][model] += cost
            totals[model] = totals.get(model, Decimal(0)) + cost
    ranked = sorted(totals, key=lambda m: (-totals[m], m))
    colours = dict(zip(ranked, PALETTE, strict=False))
    legend = [(m, colours[m], totals[m]) for m in ranked[: len(PALETTE)]]
    if len(ranked) > len(PALETTE):
        rest = sum((totals[m] for m in ranked[len(PALETTE) :]), Decimal(0))
        legend.append((f"{len(ranked) - len(PALETTE)} other models", OTHER_COLOUR, rest))

    top = _nice_ceiling(
        max((sum(d.values(), Decimal(0)) for d in per_day.values()), default=Decimal(0))
    )
    labels = [usd(top * i / 4) for i in range(5)]
    left = 12 + CHAR_WIDTH * max(len(label) for label in labels)
    plot_w, plot_h = WIDTH - left - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / days
    bars: list[Bar] = []
    for offset in range(days):
        day = first + timedelta(days=offset)
        base = Decimal(0)
        for model in ranked:  # the same stacking order every day
            amount = per_day.get(day, {}).get(model)
            if not amount:
                continue
            y0 = TOP + plot_h * float(1 - base / top)
            base += amount
            y1 = TOP + plot_h * float(1 - base / top)
            bars.append(
                Bar(
                    x=round(left + slot * offset + slot * 0.12, 2),
                    y=round(y1, 2),
                    width=round(slot * 0.76, 2),
                    height=round(max(y0 - y1, 0.5), 2),
                    colour=colours.get(model, OTHER_COLOUR),
                    title=f"{day.isoformat()} {model}: {usd(amount)}",
                )
            )
    y_ticks = tuple(Tick(round(TOP + plot_h * (1 - i / 4), 2), labels[i]) for i in range(5))
    every = max(1, -(-days // 8))  # at most about 8 day labels
    x_ticks = tuple(
        Tick(
            round(left + slot * (offset + 0.5), 2),
            (first + timedelta(days=offset)).strftime("%m-%d"),
        )
        for offset in range(0, days, every)
    )
    return Chart(
        WIDTH,
        HEIGHT,
        left,
        RIGHT,
        TOP,
        BOTTOM,
        tuple(bars),
        y_ticks,
        x_ticks,
        tuple(legend),
        first,
        last,
    )
