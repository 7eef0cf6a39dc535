"""PostgresLedger throughput: full hold lifecycles (reserve + settle) per second.

Scenarios: one hot budget with 16 and with 256 concurrent tasks, and 10,000 budgets
picked at random. Beside each, in the same run and on the same server and pool size:

* ``gatewaykit`` — PostgresLedger as shipped (the per-budget combiner on);
* ``unbatched`` — PostgresLedger with ``batch_max=1`` (one statement per operation);
* ``raw asyncpg`` — the floor: a minimal single-statement conditional reserve (CTE) and
  single-statement settle on two bare tables, no Python ledger logic.

Run: ``python -m tests.benchmarks postgres [--seconds S] [--pool N] [--dsn URL]``
(or ``python -m tests.benchmarks.bench_postgres``). Prints a Markdown table. Each test
schema is created fresh and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import anyio
import asyncpg

from gatewaykit.ledger.postgres import PostgresLedger

__all__ = ["main"]

AMOUNT = Decimal("0.000123")
NANOS = 123_000
SPREAD = 10_000

_RAW_SCHEMA = """
CREATE TABLE bench_budgets (id bigint PRIMARY KEY, lim bigint NOT NULL,
    spent bigint NOT NULL DEFAULT 0, reserved bigint NOT NULL DEFAULT 0) WITH (fillfactor = 50);
CREATE TABLE bench_holds (id text PRIMARY KEY, budget bigint NOT NULL, amount bigint NOT NULL,
    state text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
INSERT INTO bench_budgets (id, lim) SELECT g, 9000000000000000000 FROM generate_series(0, $1) g;
"""
_RAW_RESERVE = """
WITH b AS (UPDATE bench_budgets SET reserved = reserved + $2
           WHERE id = $1 AND spent + reserved + $2 <= lim RETURNING id)
INSERT INTO bench_holds (id, budget, amount, state) SELECT $3, b.id, $2, 'held' FROM b
RETURNING id
"""
_RAW_SETTLE = """
WITH h AS (UPDATE bench_holds SET state = 'settled' WHERE id = $1 AND state = 'held'
           RETURNING budget, amount)
UPDATE bench_budgets b SET reserved = b.reserved - h.amount, spent = b.spent + $2
FROM h WHERE b.id = h.budget
"""

Lifecycle = Callable[[int, str], Awaitable[None]]


async def _drive(tasks: int, seconds: float, budgets: int, lifecycle: Lifecycle) -> float:
    """``tasks`` loops of reserve+settle for ``seconds``; lifecycles per second."""
    done = 0
    deadline = time.perf_counter() + seconds
    run = secrets.token_hex(3)

    async def loop(worker: int) -> None:
        nonlocal done
        rng = random.Random(worker)
        i = 0
        while time.perf_counter() < deadline:
            budget = 0 if budgets == 1 else rng.randrange(budgets)
            await lifecycle(budget, f"{run}-{worker}-{i}")
            i += 1
            done += 1

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for worker in range(tasks):
            tg.start_soon(loop, worker)
    return done / (time.perf_counter() - start)


async def _with_schema(dsn: str, body: Callable[[str], Awaitable[float]]) -> float:
    admin: Any = await asyncpg.connect(dsn)
    schema = f"gk_bench_{secrets.token_hex(4)}"
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        return await body(schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


async def _gatewaykit(
    dsn: str, pool: int, tasks: int, seconds: float, budgets: int, batch_max: int
) -> float:
    async def body(schema: str) -> float:
        async with PostgresLedger(
            dsn, schema=schema, pool_max=pool, pool_min=pool, batch_max=batch_max
        ) as ledger:
            async with ledger._conn() as conn:  # bulk setup: 10K set_budget calls take long
                await conn.execute(
                    "INSERT INTO budgets (scope, limit_nanos, updated_at) "
                    "SELECT 'user:' || g, 9000000000000000000, now() "
                    "FROM generate_series(0, $1) g",
                    budgets - 1,
                )
                await conn.execute(
                    "INSERT INTO counters (scope, window_start) SELECT 'user:' || g, "
                    "'1970-01-01+00' FROM generate_series(0, $1) g",
                    budgets - 1,
                )
                await conn.execute("ANALYZE")

            async def lifecycle(budget: int, hold_id: str) -> None:
                await ledger.reserve(hold_id, [f"user:{budget}"], AMOUNT, ttl=60)
                await ledger.settle(hold_id, AMOUNT)

            rate = await _drive(tasks, seconds, budgets, lifecycle)
            problems = await ledger.check()
            assert problems == [], problems
            return rate

    return await _with_schema(dsn, body)


async def _no_reset(conn: Any) -> None:
    return None


async def _raw(dsn: str, pool_size: int, tasks: int, seconds: float, budgets: int) -> float:
    async def body(schema: str) -> float:
        pool: Any = await asyncpg.create_pool(
            dsn,
            min_size=pool_size,
            max_size=pool_size,
            server_settings={"search_path": schema},
            reset=_no_reset,  # as PostgresLedger: one round trip per statement
        )
        try:
            async with pool.acquire() as conn:
                for statement in _RAW_SCHEMA.strip().split(";\n"):
                    if "$1" in statement:
                        await conn.execute(statement, budgets - 1)
                    else:
                        await conn.execute(statement)
                await conn.execute("ANALYZE")

            async def lifecycle(budget: int, hold_id: str) -> None:
                async with pool.acquire() as conn:
                    assert await conn.fetchval(_RAW_RESERVE, budget, NANOS, hold_id)
                async with pool.acquire() as conn:
                    await conn.execute(_RAW_SETTLE, hold_id, NANOS)

            return await _drive(tasks, seconds, budgets, lifecycle)
        finally:
            await pool.close()

    return await _with_schema(dsn, body)


async def _run(args: argparse.Namespace) -> str:
    scenarios = [("hot budget", 16, 1), ("hot budget", 256, 1), ("10K budgets", 64, SPREAD)]
    rows = []
    for name, tasks, budgets in scenarios:
        shipped = await _gatewaykit(args.dsn, args.pool, tasks, args.seconds, budgets, 64)
        unbatched = await _gatewaykit(args.dsn, args.pool, tasks, args.seconds, budgets, 1)
        raw = await _raw(args.dsn, args.pool, tasks, args.seconds, budgets)
        rows.append((name, tasks, shipped, unbatched, raw))
    hot16, hot256 = rows[0][2], rows[1][2]
    lines = [
        f"PostgresLedger lifecycles/s (reserve + settle, durable commits), "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} CPUs, pool {args.pool}, {args.seconds:g} s per point",
        "",
        "| scenario | tasks | gatewaykit | unbatched (`batch_max=1`) | raw asyncpg | "
        "gatewaykit / raw |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, tasks, shipped, unbatched, raw in rows:
        lines.append(
            f"| {name} | {tasks} | {shipped:,.0f} | {unbatched:,.0f} | {raw:,.0f} | "
            f"{shipped / raw:.2f} |"
        )
    lines += ["", f"Hot budget, 256 tasks / 16 tasks: {hot256 / hot16:.2f} (goal ≥ 0.80)"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks postgres")
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "GATEWAYKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--seconds", type=float, default=4.0, help="per measured point")
    parser.add_argument("--pool", type=int, default=10, help="connections per pool")
    args = parser.parse_args(argv)
    print(anyio.run(_run, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
