"""Usage queries on PostgreSQL: a month of 10 M usage rows, listed and summed.

Fills a fresh schema (migrated by PostgresLedger, so with the shipped indexes) with
``--rows`` usage records spread evenly over the last ``--days`` days, generated server-side
by one ``INSERT … SELECT … generate_series`` (the secondary indexes are dropped for the
fill and rebuilt after it, as a bulk load would; ~1–2 minutes for 10 M rows), then times
``PostgresLedger.usage_totals`` and ``usage`` for the questions an operator or the admin
page asks. Each query runs ``--repeat`` times; the table shows the fastest and the median.

The fill bypasses the ledger, so the daily rollup (schema version 7) starts empty: the
benchmark first times the whole-month total as schema version 6 answered it (from the
records alone), then one ``sweep()`` — which folds all the records into the rollup, as a
migration of an existing database does — and then the queries.

Run: ``python -m tests.benchmarks usage [--rows N] [--days D] [--users N] [--dsn URL]
[--repeat N] [--keep] [--schema NAME]``. The schema is dropped at the end unless
``--keep``; ``--schema`` times the queries on a schema kept earlier, without a new fill.
A query that fails (e.g. past ``report_timeout``) is shown with its error.
"""

from __future__ import annotations

import argparse
import os
import platform
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

from gatewaykit.errors import GatewayKitError
from gatewaykit.ledger.postgres import PostgresLedger

__all__ = ["main"]

_MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "o3-mini",
    "claude-sonnet-4",
    "claude-haiku-3-5",
    "claude-opus-4",
    "gemini-2.5-pro",
    "gemini-2.5-flash",
    "llama-3.3-70b",
    "mistral-large",
    "deepseek-v3",
)

# $1 rows, $2 first instant, $3 seconds between rows, $4 users, $5 keys per user, $6 models.
# Users follow a skewed (quadratic) distribution: a few heavy users, a long tail.
_FILL = """
INSERT INTO usage_records (request_id, key_id, user_id, model, endpoint, status,
    usage_source, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
    cost_nanos, error, latency_ms, created_at)
SELECT 'req-' || g,
       'key-' || u || '-' || (g % $5),
       'user-' || u,
       ($6::text[])[1 + (g * 7) % cardinality($6::text[])],
       'chat.completions',
       CASE WHEN g % 50 = 0 THEN 'error' WHEN g % 97 = 0 THEN 'incomplete' ELSE 'success' END,
       CASE WHEN g % 50 = 0 THEN 'none' ELSE 'provider' END,
       100 + (g * 13) % 4000, 20 + (g * 17) % 800, (g * 3) % 512, 0,
       1000 + (g * 7919) % 5000000, NULL, 50 + (g * 31) % 9000,
       $2::timestamptz + make_interval(secs => g * $3::float8)
FROM (SELECT g, (((g * 2654435761) % 1000003)::float8 / 1000003) ^ 2 * $4 AS r
      FROM generate_series(1, $1::bigint) AS g) AS s,
     LATERAL (SELECT floor(s.r)::int AS u) AS pick
"""


# $1 since: the whole-month total as schema version 6 read it, from the records alone.
_V6_TOTALS = """
SELECT (created_at AT TIME ZONE 'UTC')::date, model, count(*), sum(input_tokens),
       sum(output_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_nanos)
FROM usage_records WHERE created_at >= $1 GROUP BY 1, 2
"""


async def _timed(call: Callable[[], Awaitable[Any]], repeat: int) -> str:
    """``| returned | fastest | median |`` cells, or the error of the first failure."""
    times: list[float] = []
    result: Any = None
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            result = await call()
        except GatewayKitError as exc:
            return f"failed after {time.perf_counter() - start:.1f} s: {exc} | | "
        times.append(time.perf_counter() - start)
    fastest, median = min(times) * 1000, statistics.median(times) * 1000
    return f"{len(result):,} | {fastest:,.0f} ms | {median:,.0f} ms"


async def _fill(admin: Any, args: argparse.Namespace, first: datetime) -> None:
    """``args.rows`` usage rows; secondary indexes dropped for the load and rebuilt."""
    schema = await admin.fetchval("SELECT current_schema()")
    indexes = {  # the secondary ones: not those of the primary key or UNIQUE (seq)
        r["indexname"]: r["indexdef"]
        for r in await admin.fetch(
            "SELECT indexname, indexdef FROM pg_indexes i WHERE schemaname = $1 "
            "AND tablename = 'usage_records' AND NOT EXISTS (SELECT 1 FROM pg_constraint c "
            "WHERE c.conname = i.indexname AND c.connamespace = $1::regnamespace)",
            schema,
        )
    }
    step = args.days * 86400 / args.rows
    async with admin.transaction():
        for name in indexes:
            await admin.execute(f'DROP INDEX "{name}"')
        await admin.execute(
            _FILL, args.rows, first, step, args.users, 3, list(_MODELS), timeout=3600
        )
        for definition in indexes.values():
            await admin.execute(definition, timeout=3600)
    await admin.execute("VACUUM ANALYZE usage_records", timeout=3600)


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks usage")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the filled schema")
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "GATEWAYKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--schema", help="time the queries on this kept schema (no fill)")
    args = parser.parse_args(argv)
    schema = args.schema or f"gk_bench_usage_{secrets.token_hex(4)}"
    admin: Any = await asyncpg.connect(args.dsn)
    fill_seconds = 0.0
    try:
        async with PostgresLedger(args.dsn, schema=schema):  # creates and migrates it
            pass
        await admin.execute(f'SET search_path TO "{schema}"')
        if args.schema:
            last = await admin.fetchval("SELECT max(created_at) FROM usage_records")
            now = last.replace(microsecond=0) + timedelta(seconds=1)
            first = now - timedelta(days=args.days)
        else:
            now = datetime.now(timezone.utc).replace(microsecond=0)
            first = now - timedelta(days=args.days)
            started = time.perf_counter()
            await _fill(admin, args, first)
            fill_seconds = time.perf_counter() - started
        rows = await admin.fetchval("SELECT count(*) FROM usage_records")
        size = await admin.fetchval(
            "SELECT pg_size_pretty(pg_total_relation_size('usage_records'))"
        )
        heavy = await admin.fetchval(
            "SELECT user_id FROM usage_records WHERE created_at >= $1 "
            "GROUP BY 1 ORDER BY count(*) DESC LIMIT 1",
            now - timedelta(hours=1),
        )
        typical = f"user-{args.users // 2}"
        typical_key = f"key-{args.users // 2}-1"

        month = first
        day = now - timedelta(days=1)
        async with PostgresLedger(args.dsn, schema=schema) as ledger:
            before = await _timed(lambda: admin.fetch(_V6_TOTALS, month, timeout=3600), args.repeat)
            started = time.perf_counter()
            await ledger.sweep()
            sweep_seconds = time.perf_counter() - started
            # Statistics for the filled rollup, as autovacuum would gather them shortly.
            await admin.execute("ANALYZE usage_daily", timeout=3600)
            queries: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
                (
                    "totals by (day, model), whole month",
                    lambda: ledger.usage_totals(group_by=("day", "model"), since=month),
                ),
                (
                    "totals by user, whole month",
                    lambda: ledger.usage_totals(group_by=("user",), since=month),
                ),
                (
                    "totals by model, last 24 h",
                    lambda: ledger.usage_totals(group_by=("model",), since=day),
                ),
                (
                    "totals by (day, model), last 7 days",
                    lambda: ledger.usage_totals(
                        group_by=("day", "model"), since=now - timedelta(days=7)
                    ),
                ),
                (
                    f"totals by (day, model), month, heaviest user ({heavy})",
                    lambda: ledger.usage_totals(group_by=("day", "model"), user=heavy),
                ),
                (
                    f"totals by (day, model), month, a typical user ({typical})",
                    lambda: ledger.usage_totals(group_by=("day", "model"), user=typical),
                ),
                (
                    f"totals by day, month, one key ({typical_key})",
                    lambda: ledger.usage_totals(group_by=("day",), key=typical_key),
                ),
                (
                    "totals by day, month, one model (gpt-4o)",
                    lambda: ledger.usage_totals(group_by=("day",), model="gpt-4o", since=month),
                ),
                ("listing, newest 100", lambda: ledger.usage(limit=100)),
                (
                    "listing, newest 100 of the heaviest user, last 24 h",
                    lambda: ledger.usage(user=heavy, since=day, limit=100),
                ),
                (
                    "listing, 100 of one model in a 1 h window a week ago",
                    lambda: ledger.usage(
                        model="gpt-4o",
                        since=now - timedelta(days=7),
                        until=now - timedelta(days=7) + timedelta(hours=1),
                        limit=100,
                    ),
                ),
            ]
            results = [(name, await _timed(call, args.repeat)) for name, call in queries]
    finally:
        if not args.keep and not args.schema:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()

    print(
        f"\n## Usage queries on PostgreSQL ({rows:,} rows over {args.days} days, "
        f"{args.users:,} users, {len(_MODELS)} models)\n"
    )
    print(
        f"{platform.node()} · {os.cpu_count()} CPUs · load {os.getloadavg()[0]:.1f} · "
        + (f"fill {fill_seconds:.0f} s · " if fill_seconds else "")
        + f"usage_records {size}"
        + (f" · schema kept: {schema}" if args.keep or args.schema else "")
        + "\n"
    )
    print("| query | rows/groups returned | fastest | median |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| before the rollup: totals by (day, model), whole month, from the records | {before} |"
    )
    print(f"| sweep that folds them all into the rollup | | {sweep_seconds * 1000:,.0f} ms | |")
    for name, cells in results:
        print(f"| {name} | {cells} |")
