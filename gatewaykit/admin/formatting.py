"""How the admin page writes money, times and durations (Jinja2 filters)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from gatewaykit.ledger.base import BudgetStatus, Period

__all__ = ["FILTERS", "bar_widths", "duration", "period_words", "usd", "when"]


def usd(value: Decimal | int | None) -> str:
    """Exact dollars: at least cents, every nano-USD that is there, never an exponent."""
    if value is None:
        return "no limit"
    whole, _, fraction = f"{Decimal(value).normalize():f}".partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


def when(value: datetime | None) -> str:
    """A UTC time to the second, as an operator reads it."""
    if value is None:
        return "never"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def duration(value: timedelta | float) -> str:
    """A duration in its largest sensible unit: "45 s", "12 min", "3 h 5 min", "2 d 4 h"."""
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else value)
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 3600:
        return f"{sign}{minutes} min"
    if seconds < 86400:
        return f"{sign}{hours} h {minutes % 60} min"
    return f"{sign}{days} d {hours % 24} h"


def bar_widths(status: BudgetStatus) -> dict[str, Any]:
    """Widths out of 100 for a budget's bar: spent, then held; ``full`` at or past the limit."""
    limit, spent, held = status.limit, status.spent, status.held
    if not limit:  # no limit, or a limit of 0
        full = limit is not None and bool(spent or held)
        return {"spent": 100 if full else 0, "held": 0, "full": full}
    spent_width = min(spent / limit * 100, Decimal(100))
    held_width = min(held / limit * 100, 100 - spent_width)
    return {
        "spent": round(float(spent_width), 2),
        "held": round(float(held_width), 2),
        "full": spent + held >= limit,
    }


def period_words(period: Period) -> str:
    if period.kind == "none":
        return "in total"
    if period.kind == "rolling":
        return f"per {duration(period.seconds or 0)}"
    return f"per {period.kind}"


FILTERS: dict[str, Callable[..., Any]] = {
    "usd": usd,
    "when": when,
    "duration": duration,
    "period_words": period_words,
    "bar_widths": bar_widths,
}
