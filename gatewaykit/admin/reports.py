"""The usage page's filter (from the query string) and its CSV export."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Iterable, Mapping
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

from gatewaykit.csvcells import text_cell
from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import UsageRecord

__all__ = ["CSV_COLUMNS", "UsageQuery", "usage_csv"]

CSV_COLUMNS = (
    "created_at",
    "request_id",
    "key_id",
    "user",
    "model",
    "endpoint",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost",
    "usage_source",
    "status",
)


def _day(params: Mapping[str, str], name: str, label: str) -> date | None:
    text = params.get(name, "").strip()
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(f"{label} must be a date, YYYY-MM-DD: {text!r}") from None


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=timezone.utc)


@dataclasses.dataclass(frozen=True, slots=True)
class UsageQuery:
    """What the usage page was asked for: UTC days (``until`` inclusive) and exact matches."""

    since: date | None = None
    until: date | None = None
    user: str | None = None
    key: str | None = None
    model: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> UsageQuery:
        since = _day(params, "since", "From")
        until = _day(params, "until", "To")
        if since is not None and until is not None and until < since:
            raise ConfigurationError("the range ends before it starts")
        text = {n: params.get(n, "").strip() or None for n in ("user", "key", "model")}
        return cls(since, until, **text)

    def ledger_filter(self, *, since: date | None = None) -> dict[str, Any]:
        """Keyword arguments for ``Ledger.usage`` / ``usage_totals`` (``since`` overrides)."""
        start = since or self.since
        return {
            "since": None if start is None else _midnight(start),
            "until": None if self.until is None else _midnight(self.until + timedelta(days=1)),
            "user": self.user,
            "key": self.key,
            "model": self.model,
        }


def _cell(value: object) -> object:
    return f"{value:f}" if isinstance(value, Decimal) else text_cell(value)


def usage_csv(records: Iterable[UsageRecord]) -> str:
    """The records as CSV: money as exact decimal strings, times ISO 8601 UTC."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in records:
        created = r.created_at.astimezone(timezone.utc).isoformat() if r.created_at else ""
        row: list[object] = [created]
        row += [_cell(getattr(r, name)) for name in CSV_COLUMNS[1:]]
        writer.writerow(row)
    return out.getvalue()
