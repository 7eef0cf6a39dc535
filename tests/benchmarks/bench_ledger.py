"""SQLiteLedger throughput: reserve+settle lifecycles per second.

``python -m tests.benchmarks ledger [--seconds S] [--synchronous FULL|NORMAL]``

Every point opens a fresh database file with durable settings (WAL, ``synchronous=FULL``
unless told otherwise), then N tasks each loop ``reserve → settle`` for S seconds on one
hot budget or on 10,000 budgets picked at random. Beside it, in the same run, a raw
stdlib ``sqlite3`` baseline: one thread, same settings, the textbook two transactions per
lifecycle (a conditional ``UPDATE`` + hold ``INSERT``, then a claim + counter move).

Last, voluntary context switches per lifecycle at 1 and 16 tasks (from
``/proc/self/task/*/status``): how many times a thread went to sleep waiting for another,
i.e. the cost of the hand-offs between the event loop and the writer thread.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import sqlite3
import tempfile
import threading
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from gatewaykit.ledger.base import Period
from gatewaykit.ledger.sqlite import SQLiteLedger

TASKS = (1, 16, 256)
SWITCH_TASKS = (1, 16)
LAYOUTS = {"hot budget": 1, "10K budgets": 10_000}
AMOUNT = Decimal("0.001")


async def ledger_point(
    path: Path, tasks: int, budgets: int, seconds: float, synchronous: str
) -> tuple[float, float]:
    """(lifecycles/s, CPU µs per lifecycle across all threads of this process)."""
    scopes = [f"user:u{i}" for i in range(budgets)]
    async with SQLiteLedger(str(path), synchronous=synchronous) as ledger:  # type: ignore[arg-type]
        await asyncio.gather(
            *(ledger.set_budget(s, limit=Decimal(10**9), period=Period("day")) for s in scopes)
        )
        done = 0
        stop = time.perf_counter() + seconds

        async def worker(n: int) -> None:
            nonlocal done
            rng = random.Random(n)
            i = 0
            while time.perf_counter() < stop:
                hold_id = f"t{n}-{i}"
                await ledger.reserve(hold_id, [rng.choice(scopes)], AMOUNT, ttl=60)
                await ledger.settle(hold_id, AMOUNT)
                i += 1
            done += i

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(n) for n in range(tasks)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        problems = await ledger.check()
        assert not problems, problems
    return done / elapsed, cpu / done * 1e6


def _switches() -> tuple[int, int]:
    """Voluntary context switches so far: (this thread, all threads of the process).

    A voluntary switch is a thread going to sleep — the event loop waiting for the
    writer's answer, the writer waiting for work — so per lifecycle it counts the
    cross-thread hand-offs, which is what group commit tries to share across a batch.
    """

    def read(status: Path) -> int:
        for line in status.read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
        return 0

    own = read(Path(f"/proc/self/task/{threading.get_native_id()}/status"))
    total = 0
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            total += read(task / "status")
    return own, total


async def switches_point(
    path: Path, tasks: int, lifecycles: int, synchronous: str
) -> tuple[float, float]:
    """Voluntary context switches per reserve+settle lifecycle: (loop thread, all threads)."""
    async with SQLiteLedger(str(path), synchronous=synchronous) as ledger:  # type: ignore[arg-type]
        await ledger.set_budget("user:u0", limit=Decimal(10**9), period=Period("day"))
        await ledger.reserve("warm", ["user:u0"], AMOUNT, ttl=60)
        per_task = lifecycles // tasks

        async def worker(n: int) -> None:
            for i in range(per_task):
                hold_id = f"s{n}-{i}"
                await ledger.reserve(hold_id, ["user:u0"], AMOUNT, ttl=60)
                await ledger.settle(hold_id, AMOUNT)

        own, total = _switches()
        await asyncio.gather(*(worker(n) for n in range(tasks)))
        own_after, total_after = _switches()
    done = per_task * tasks
    return (own_after - own) / done, (total_after - total) / done


def baseline_point(
    path: Path, budgets: int, seconds: float, synchronous: str
) -> tuple[float, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(
        "CREATE TABLE budgets (scope TEXT PRIMARY KEY, lim INTEGER, spent INTEGER, "
        "reserved INTEGER)"
    )
    conn.execute(
        "CREATE TABLE holds (hold_id TEXT PRIMARY KEY, scope TEXT, amount INTEGER, state TEXT)"
    )
    conn.executemany(
        "INSERT INTO budgets VALUES (?, ?, 0, 0)", [(f"user:u{i}", 10**18) for i in range(budgets)]
    )
    amount = 1_000_000
    rng = random.Random(0)
    done = 0
    started, cpu = time.perf_counter(), time.process_time()
    stop = started + seconds
    while time.perf_counter() < stop:
        hold_id, scope = f"h{done}", f"user:u{rng.randrange(budgets)}"
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "UPDATE budgets SET reserved = reserved + ? WHERE scope = ? "
            "AND spent + reserved + ? <= lim RETURNING 1",
            (amount, scope, amount),
        ).fetchone()
        assert row is not None
        conn.execute("INSERT INTO holds VALUES (?, ?, ?, 'held')", (hold_id, scope, amount))
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        held = conn.execute(
            "UPDATE holds SET state = 'settled' WHERE hold_id = ? AND state = 'held' "
            "RETURNING amount",
            (hold_id,),
        ).fetchone()
        conn.execute(
            "UPDATE budgets SET reserved = reserved - ?, spent = spent + ? WHERE scope = ?",
            (held[0], amount, scope),
        )
        conn.execute("COMMIT")
        done += 1
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    conn.close()
    return done / elapsed, cpu / done * 1e6


async def run(seconds: float, synchronous: str) -> str:
    rows = []
    with tempfile.TemporaryDirectory(prefix="gk-bench-ledger-") as tmp:
        for layout, budgets in LAYOUTS.items():
            base = baseline_point(Path(tmp) / f"base-{budgets}.db", budgets, seconds, synchronous)
            cells = [base]
            for tasks in TASKS:
                path = Path(tmp) / f"ledger-{budgets}-{tasks}.db"
                cells.append(await ledger_point(path, tasks, budgets, seconds, synchronous))
            rows.append(
                f"| {layout} | "
                + " | ".join(f"{rate:,.0f} ({cpu:,.0f} µs)" for rate, cpu in cells)
                + " |"
            )
        switches = [
            await switches_point(Path(tmp) / f"switches-{tasks}.db", tasks, 2048, synchronous)
            for tasks in SWITCH_TASKS
        ]
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"Reserve+settle lifecycles/s, `synchronous={synchronous}`, WAL, {seconds:g} s per "
        f"point ({now}; Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end). "
        "In brackets: CPU time per lifecycle, all threads.\n\n"
        "| budgets | raw sqlite3, 1 thread | gatewaykit, 1 task | 16 tasks | 256 tasks |\n"
        "| --- | ---: | ---: | ---: | ---: |\n"
    )
    footer = (
        "\n\nVoluntary context switches per lifecycle, hot budget, 2,048 lifecycles "
        "(event-loop thread / all threads):\n\n"
        "| | " + " | ".join(f"{t} task{'s' if t > 1 else ''}" for t in SWITCH_TASKS) + " |\n"
        "| --- |" + " ---: |" * len(SWITCH_TASKS) + "\n"
        "| gatewaykit | " + " | ".join(f"{own:.2f} / {total:.2f}" for own, total in switches) + " |"
    )
    return header + "\n".join(rows) + footer


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks ledger")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL")
    args = parser.parse_args(argv)
    print(asyncio.run(run(args.seconds, args.synchronous)))
