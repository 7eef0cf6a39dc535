"""``gatewaykit usage``: time ranges, filters, grouping and the three output formats."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from gatewaykit.ledger.base import Ledger, UsageRecord
from gatewaykit.ledger.sqlite import SQLiteLedger
from tests.cli.test_cli import cli, cli_json, with_ledger
from tests.ledger.backends import FakeClock

D = Decimal
#: (request id, UTC time, user, key id, model, cost, status, source, latency ms)
ROWS = [
    ("r1", "2026-01-15T12:00:00", "alice", "k1", "gpt-4o", "0.25", "success", "provider", 120),
    ("r2", "2026-01-15T23:59:59", "bob", "k2", "claude", "0.000000001", "success", "provider", 80),
    ("r3", "2026-01-16T00:00:00", "alice", "k1", "claude", "1.5", "incomplete", "partial", 3000),
    ("r4", "2026-01-16T06:30:00", "alice", "k3", "gpt-4o", "0", "error", "none", None),
]


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A ledger file holding ROWS, each written by a settle (or release) at its time."""
    path = tmp_path / "ledger.db"
    clock = FakeClock(datetime.fromisoformat(ROWS[0][1] + "+00:00").timestamp())

    async def fill() -> None:
        async with SQLiteLedger(str(path), clock=clock) as ledger:
            for rid, at, user, key, model, cost, status, source, latency in ROWS:
                clock.t = datetime.fromisoformat(at + "+00:00").timestamp()
                record = UsageRecord(
                    request_id=rid,
                    model=model,
                    endpoint="/v1/chat/completions",
                    status=status,
                    usage_source=source,
                    key_id=key,
                    user=user,
                    input_tokens=100,
                    output_tokens=10,
                    cache_read_tokens=5,
                    cache_write_tokens=1,
                    cost=D(cost),
                    latency_ms=latency,
                )
                await ledger.reserve(rid, [f"user:{user}"], D(2), ttl=60)
                if D(cost):
                    await ledger.settle(rid, D(cost), record=record)
                else:
                    await ledger.release(rid, record=record)

    anyio.run(fill)
    return f"sqlite:///{path}"


def ids(*args: str) -> list[str]:
    return [row["request_id"] for row in cli_json("--db", *args, "--format", "json")]


def test_the_table_shows_time_latency_tokens_cost_source_and_status(db: str) -> None:
    result = cli("--db", db, "usage")
    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split() == [
        "TIME",
        "(UTC)",
        "REQUEST_ID",
        "USER",
        "KEY_ID",
        "MODEL",
        "IN",
        "OUT",
        "CACHE_R",
        "CACHE_W",
        "COST",
        "MS",
        "SOURCE",
        "STATUS",
    ]
    assert [line.split()[2] for line in lines] == ["r4", "r3", "r2", "r1"]  # newest first
    assert lines[2].split() == [
        "2026-01-15",
        "23:59:59",
        "r2",
        "bob",
        "k2",
        "claude",
        "100",
        "10",
        "5",
        "1",
        "0.000000001",  # never 1E-9
        "80",
        "provider",
        "success",
    ]
    assert lines[0].split()[-3:] == ["-", "none", "error"]  # no latency recorded


def test_json_rows_carry_the_time_and_latency(db: str) -> None:
    rows = cli_json("--db", db, "usage", "--json")
    assert rows[1]["created_at"] == "2026-01-16T00:00:00+00:00"
    assert (rows[1]["latency_ms"], rows[1]["cost"], rows[1]["status"]) == (
        3000,
        "1.5",
        "incomplete",
    )
    assert rows == cli_json("--db", db, "--json", "usage", "--format", "json")


def test_since_is_inclusive_until_exclusive(db: str) -> None:
    assert ids(db, "usage", "--since", "2026-01-16") == ["r4", "r3"]
    assert ids(db, "usage", "--until", "2026-01-16") == ["r2", "r1"]
    assert ids(db, "usage", "--since", "2026-01-15T23:59:59Z", "--until", "2026-01-16T06:30") == [
        "r3",
        "r2",
    ]
    # An offset is honoured; without one the time is UTC.
    assert ids(db, "usage", "--since", "2026-01-16T01:00:00+01:00") == ["r4", "r3"]
    assert ids(db, "usage", "--since", "2026-01-16T07:00") == []


def test_spans_count_back_from_now(db: str) -> None:
    assert ids(db, "usage", "--since", "7d") == []  # ROWS lie in January 2026
    assert ids(db, "usage", "--until", "24h") == ["r4", "r3", "r2", "r1"]

    async def now_row(ledger: Ledger) -> None:  # written at the real clock's now
        await ledger.reserve("fresh", ["user:carol"], D(1), ttl=60)
        record = UsageRecord(
            "fresh", "gpt-4o", "/v1/chat/completions", "success", "provider", user="carol"
        )
        await ledger.settle("fresh", D("0.1"), record=record)

    with_ledger(db, now_row)
    assert ids(db, "usage", "--since", "1h") == ["fresh"]
    assert ids(db, "usage", "--since", "90s", "--user", "carol") == ["fresh"]
    assert "fresh" not in ids(db, "usage", "--until", "1h")


def test_filters_combine(db: str) -> None:
    assert ids(db, "usage", "--user", "alice") == ["r4", "r3", "r1"]
    assert ids(db, "usage", "--key", "k1") == ["r3", "r1"]
    assert ids(db, "usage", "--model", "claude") == ["r3", "r2"]
    assert ids(db, "usage", "--user", "alice", "--model", "claude", "--key", "k1") == ["r3"]
    assert ids(db, "usage", "--user", "alice", "--limit", "1") == ["r4"]
    assert ids(db, "usage", "--user", "nobody") == []


def test_group_by_day_and_model(db: str) -> None:
    rows = cli_json("--db", db, "usage", "--group-by", "day", "--group-by", "model", "--json")
    assert rows == [
        {
            "day": "2026-01-15",
            "model": "claude",
            "requests": 1,
            "input_tokens": 100,
            "output_tokens": 10,
            "cache_read_tokens": 5,
            "cache_write_tokens": 1,
            "cost": "0.000000001",
        },
        {
            "day": "2026-01-15",
            "model": "gpt-4o",
            "requests": 1,
            "input_tokens": 100,
            "output_tokens": 10,
            "cache_read_tokens": 5,
            "cache_write_tokens": 1,
            "cost": "0.25",
        },
        {
            "day": "2026-01-16",
            "model": "claude",
            "requests": 1,
            "input_tokens": 100,
            "output_tokens": 10,
            "cache_read_tokens": 5,
            "cache_write_tokens": 1,
            "cost": "1.5",
        },
        {
            "day": "2026-01-16",
            "model": "gpt-4o",
            "requests": 1,
            "input_tokens": 100,
            "output_tokens": 10,
            "cache_read_tokens": 5,
            "cache_write_tokens": 1,
            "cost": "0",
        },
    ]
    assert rows == cli_json("--db", db, "usage", "--group-by", "day,model", "--json")


def test_group_by_user_as_table_and_csv(db: str) -> None:
    table = cli("--db", db, "usage", "--group-by", "user", "--since", "2026-01-15T18:00Z")
    assert table.exit_code == 0, table.output
    assert [line.split() for line in table.stdout.splitlines()] == [
        ["USER", "REQUESTS", "IN", "OUT", "CACHE_R", "CACHE_W", "COST"],
        ["alice", "2", "200", "20", "10", "2", "1.5"],
        ["bob", "1", "100", "10", "5", "1", "0.000000001"],
    ]
    result = cli("--db", db, "usage", "--group-by", "key", "--format", "csv", "--model", "gpt-4o")
    assert result.exit_code == 0, result.output
    assert list(csv.reader(io.StringIO(result.stdout))) == [
        [
            "key",
            "requests",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "cost",
        ],
        ["k1", "1", "100", "10", "5", "1", "0.25"],
        ["k3", "1", "100", "10", "5", "1", "0"],
    ]


def test_records_as_csv(db: str) -> None:
    result = cli("--db", db, "usage", "--format", "csv", "--until", "2026-01-16")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["request_id"] for r in rows] == ["r2", "r1"]
    assert rows[0]["created_at"] == "2026-01-15T23:59:59+00:00"
    assert (rows[0]["latency_ms"], rows[0]["cost"], rows[0]["usage_source"]) == (
        "80",
        "0.000000001",
        "provider",
    )


def test_csv_defuses_formula_cells_but_not_numbers(tmp_path: Path) -> None:
    """User-controlled text that a spreadsheet would run gets a leading "'" (OWASP)."""
    path = tmp_path / "ledger.db"
    hostile = {"user": "=cmd|' /C calc'!A0", "model": "+gpt", "key_id": "@k"}

    async def fill() -> None:
        async with SQLiteLedger(str(path)) as ledger:
            await ledger.reserve("-r", ["user:x"], D(1), ttl=60)
            record = UsageRecord(
                request_id="-r",
                endpoint="\tmessages",
                status="success",
                usage_source="provider",
                input_tokens=1,
                cost=D("0.0000712"),
                user=hostile["user"],
                model=hostile["model"],
                key_id=hostile["key_id"],
            )
            await ledger.settle("-r", D("0.0000712"), record=record)

    anyio.run(fill)
    db = f"sqlite:///{path}"
    [row] = list(csv.DictReader(io.StringIO(cli("--db", db, "usage", "--format", "csv").stdout)))
    assert {k: row[k] for k in hostile} == {k: "'" + v for k, v in hostile.items()}
    assert (row["request_id"], row["endpoint"]) == ("'-r", "'\tmessages")
    assert (row["input_tokens"], row["cost"]) == ("1", "0.0000712")
    grouped = cli("--db", db, "usage", "--group-by", "user,model", "--format", "csv")
    [total] = list(csv.DictReader(io.StringIO(grouped.stdout)))
    assert (total["user"], total["model"], total["cost"]) == (
        "'=cmd|' /C calc'!A0",
        "'+gpt",
        "0.0000712",
    )


def test_empty_results(db: str) -> None:
    assert cli_json("--db", db, "usage", "--model", "nope", "--json") == []
    assert cli_json("--db", db, "usage", "--group-by", "day", "--since", "1h", "--json") == []
    table = cli("--db", db, "usage", "--group-by", "model", "--user", "nobody")
    assert table.stdout.strip() == "No usage recorded."
    empty = cli("--db", db, "usage", "--format", "csv", "--user", "nobody")
    assert empty.stdout.splitlines()[0].startswith("created_at,request_id,")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "neither an ISO 8601 date-time"),
        (["--until", "2026-13-01"], "neither an ISO 8601 date-time"),
        (["--since", "5y"], "nor a span ago"),
        (["--since", "2026-01-17", "--until", "2026-01-16"], "is after --until"),
        (["--group-by", "week"], "cannot group by 'week'"),
        (["--group-by", "day,day"], "names a group twice"),
        (["--format", "xml"], "'xml' is not one of"),
        (["--json", "--format", "csv"], "--json conflicts with --format csv"),
        (["--group-by", "user", "--limit", "5"], "--limit applies to the listing"),
        (["--limit", "0"], "--limit"),
        (
            ["--limit", str(10**30)],
            "'--limit': 1000000000000000000000000000000 is not in the range",
        ),
    ],
)
def test_bad_input_is_a_clear_usage_error(db: str, args: list[str], message: str) -> None:
    result = cli("--db", db, "usage", *args)
    assert result.exit_code == 2
    assert message in result.output


def test_holds_limit_too_large_for_the_database_is_a_usage_error(db: str) -> None:
    result = cli("--db", db, "holds", "--limit", str(10**30))
    assert result.exit_code == 2
    assert "is not in the range 1<=x<=9223372036854775807" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_span_too_long_is_a_usage_error_not_a_crash(db: str) -> None:
    result = cli("--db", db, "usage", "--since", "999999999999w")
    assert result.exit_code == 2
    assert "before year 1" in result.output
