"""The usage chart's geometry and the usage page's filter and CSV, without a server."""

from __future__ import annotations

import csv
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from gatewaykit.admin.charts import MAX_DAYS, PALETTE, spend_chart
from gatewaykit.admin.reports import UsageQuery, usage_csv
from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import UsageRecord

D1, D2 = date(2026, 3, 1), date(2026, 3, 2)


def test_bars_stack_per_day_in_one_model_order_on_a_nice_axis() -> None:
    chart = spend_chart(
        [(D1, "a", Decimal("0.6")), (D1, "b", Decimal("0.3")), (D2, "b", Decimal("0.1"))],
        first=D1,
        last=D2,
    )
    assert [t.label for t in chart.y_ticks] == [
        "$0.00", "$0.25", "$0.50", "$0.75", "$1.00",
    ]  # fmt: skip
    day1 = [b for b in chart.bars if b.title.startswith("2026-03-01")]
    assert [b.title for b in day1] == ["2026-03-01 a: $0.60", "2026-03-01 b: $0.30"]
    a, b = day1
    bottom = chart.height - chart.bottom
    assert a.y + a.height == pytest.approx(bottom)  # the first model sits on the axis
    assert b.y + b.height == pytest.approx(a.y)  # the next one on top of it
    assert a.height / b.height == pytest.approx(2, rel=0.01)
    assert [(m, c, t) for m, c, t in chart.legend] == [
        ("a", PALETTE[0], Decimal("0.6")),
        ("b", PALETTE[1], Decimal("0.4")),
    ]
    assert not chart.empty


def test_models_past_the_palette_share_one_colour_and_legend_line() -> None:
    points = [(D1, f"m{i}", Decimal(100 - i)) for i in range(len(PALETTE) + 3)]
    chart = spend_chart(points, first=D1, last=D1)
    assert chart.legend[-1][0] == "3 other models"
    assert chart.legend[-1][2] == sum(Decimal(100 - i) for i in range(len(PALETTE), len(points)))
    assert len({b.colour for b in chart.bars}) == len(PALETTE) + 1


def test_the_range_is_capped_and_empty_days_draw_nothing() -> None:
    last = date(2026, 12, 31)
    chart = spend_chart([(date(2020, 1, 1), "a", Decimal(1))], first=date(2020, 1, 1), last=last)
    assert chart.first == last - timedelta(days=MAX_DAYS - 1)
    assert chart.empty
    assert [t.label for t in chart.y_ticks][-1] == "$1.00"


def test_a_tiny_spend_keeps_its_exact_digits_on_the_axis() -> None:
    chart = spend_chart([(D1, "a", Decimal("0.0000042"))], first=D1, last=D1)
    assert chart.y_ticks[-1].label == "$0.000005"
    assert chart.left >= 12 + 7 * len("$0.00000375")


def test_the_filter_reads_utc_days_with_an_inclusive_end() -> None:
    query = UsageQuery.from_params({"since": "2026-03-01", "until": "2026-03-02", "user": " a "})
    assert query.ledger_filter() == {
        "since": datetime(2026, 3, 1, tzinfo=timezone.utc),
        "until": datetime(2026, 3, 3, tzinfo=timezone.utc),
        "user": "a",
        "key": None,
        "model": None,
    }
    with pytest.raises(ConfigurationError, match="YYYY-MM-DD"):
        UsageQuery.from_params({"since": "yesterday"})
    with pytest.raises(ConfigurationError, match="ends before it starts"):
        UsageQuery.from_params({"since": "2026-03-02", "until": "2026-03-01"})


def test_csv_keeps_money_exact_and_defuses_formulas() -> None:
    record = UsageRecord(
        request_id="r1",
        model='=HYPERLINK("http://x")',
        endpoint="chat.completions",
        status="success",
        usage_source="provider",
        key_id="k1",
        user="@alice",
        input_tokens=3,
        cost=Decimal("1E-9"),
        created_at=datetime(2026, 3, 1, 12, tzinfo=timezone.utc),
    )
    [row] = list(csv.DictReader(usage_csv([record]).splitlines()))
    assert row["cost"] == "0.000000001"
    assert row["created_at"] == "2026-03-01T12:00:00+00:00"
    assert row["model"] == '\'=HYPERLINK("http://x")'
    assert row["user"] == "'@alice"
    assert row["input_tokens"] == "3"
