"""What recording admissions costs per request, in-process (not part of the test run).

Before: a request's only durable write in platform mode was its report (one ``enqueue``).
After: ``admit`` before it goes upstream, then ``complete`` (report + close, one
transaction). Measured on the outbox alone — no HTTP — at ``c`` requests in flight, so the
difference is the added write; wall time per request at c=1 is the latency a request gains,
at higher c the group commit shares fsyncs.

.venv/bin/python -m tests.platform.bench_admissions [--count N] [--postgres DSN]
.venv/bin/python -m tests.platform.bench_admissions --callgrind N   # instructions, needs valgrind

``--callgrind N`` counts user-space instructions per request under valgrind (all threads,
so the SQLite writer thread too; not the kernel's fsync): runs with 0 and N requests, the
difference divided by N. Deterministic whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from gatewaykit.outbox import Outbox, SQLiteOutbox

DETAILS = {
    "attempt_ids": ["att_1234", "att_1235"],
    "model": "gpt-4o-mini",
    "endpoint": "chat.completions",
    "prompt_tokens_estimate": 812,
    "estimate_usd": "0.0006015",
}


def report(request_id: str) -> tuple[str, dict[str, Any]]:
    return f"{request_id}:att_1234", {
        "request_id": request_id,
        "attempt_id": "att_1234",
        "status": "success",
        "usage": {
            "input_tokens": 812,
            "output_tokens": 95,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
        },
        "usage_source": "provider",
        "observed": {
            "upstream_contacted": True,
            "committed": True,
            "output_chars": 377,
            "prompt_tokens_estimate": 790,
        },
    }


async def before(box: Any, request_id: str) -> None:
    await box.enqueue(*report(request_id))


async def after(box: Any, request_id: str) -> None:
    assert await box.admit(request_id, DETAILS, owner="bench")
    assert await box.complete(request_id, *report(request_id))


async def measure(
    box: Outbox, step: Callable[[Any, str], Awaitable[None]], count: int, concurrency: int
) -> tuple[float, float]:
    """(wall µs per request, CPU µs per request) for ``count`` requests, ``concurrency`` at
    a time."""
    prefix = uuid.uuid4().hex[:8]
    per_worker = count // concurrency

    async def worker(w: int) -> None:
        for n in range(per_worker):
            await step(box, f"req_{prefix}_{w}_{n}")

    wall, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for w in range(concurrency):
            tg.start_soon(worker, w)
    done = per_worker * concurrency
    return (
        (time.perf_counter() - wall) / done * 1e6,
        (time.process_time() - cpu) / done * 1e6,
    )


async def commit_p50(box: Outbox, samples: int = 300) -> float:
    """Median latency of one lone durable write (µs), after as many to warm up."""
    times = []
    for n in range(2 * samples):
        started = time.perf_counter()
        await box.enqueue(f"p50_{uuid.uuid4().hex}_{n}", {"n": n})
        times.append(time.perf_counter() - started)
    return statistics.median(times[samples:]) * 1e6


async def bench(name: str, make: Callable[[], Outbox], count: int, rounds: int) -> None:
    print(f"\n{name}")
    async with make() as box:
        print(f"  one durable write alone, p50: {await commit_p50(box):,.0f} µs")
        for concurrency in (1, 16, 64):
            n = count if concurrency == 1 else count * 4
            results: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            for _ in range(rounds):  # interleaved, so drift in the machine's load hits both
                results["before"].append(await measure(box, before, n, concurrency))
                results["after"].append(await measure(box, after, n, concurrency))
            rows = {
                label: (
                    statistics.median(r[0] for r in runs),
                    statistics.median(r[1] for r in runs),
                )
                for label, runs in results.items()
            }
            (wb, cb), (wa, ca) = rows["before"], rows["after"]
            print(
                f"  c={concurrency:<3} wall/request: before {wb:7.0f} µs, after {wa:7.0f} µs "
                f"(+{wa - wb:5.0f} µs)   CPU/request: before {cb:5.0f} µs, after {ca:5.0f} µs "
                f"(+{ca - cb:4.0f} µs)"
            )


async def one_run(step: str, count: int, concurrency: int) -> None:
    """``count`` requests of one kind on a fresh SQLite FULL outbox (for --callgrind)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with SQLiteOutbox(str(Path(tmp) / "o.db")) as box:
            await box.enqueue("warm:1", {"n": 1})
            if count:
                await measure(box, before if step == "before" else after, count, concurrency)


def instructions(step: str, count: int, concurrency: int) -> int:
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, "-m", "tests.platform.bench_admissions", "--step", step,
        "--count", str(count), "--concurrency", str(concurrency),
    ]  # fmt: skip
    err = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    match = re.search(r"Collected : (\d+)", err)
    assert match, err[-2000:]
    return int(match.group(1))


def callgrind(count: int) -> None:
    print("SQLite outbox, synchronous=FULL: user-space instructions per request (callgrind)")
    for concurrency in (1, 16):
        per = {}
        for step in ("before", "after"):
            base = instructions(step, 0, concurrency)
            per[step] = (instructions(step, count, concurrency) - base) / count
        print(
            f"  c={concurrency:<3} before {per['before'] / 1e3:6.0f} k, "
            f"after {per['after'] / 1e3:6.0f} k (+{(per['after'] - per['before']) / 1e3:5.0f} k)"
        )


async def main(count: int, rounds: int, postgres: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for synchronous in ("FULL", "NORMAL"):
            path = str(Path(tmp) / f"{synchronous}.db")
            await bench(
                f"SQLite outbox, synchronous={synchronous}",
                functools.partial(SQLiteOutbox, path, synchronous=synchronous),
                count,
                rounds,
            )
    if postgres:
        from gatewaykit.outbox.postgres import PostgresOutbox

        table = f"gk_bench_{uuid.uuid4().hex[:8]}"
        try:
            await bench(
                "PostgreSQL outbox (pool of 4)",
                lambda: PostgresOutbox(postgres, table=table, max_size=4),
                count,
                rounds,
            )
        finally:
            import asyncpg

            conn = await asyncpg.connect(postgres)
            try:
                for suffix in ("", "_admissions", "_instances"):
                    await conn.execute(f"DROP TABLE IF EXISTS {table}{suffix}")
            finally:
                await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="requests at c=1 (x4 above)")
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    parser.add_argument("--postgres", metavar="DSN", help="also measure a PostgreSQL outbox")
    parser.add_argument("--callgrind", type=int, default=0, help="count instructions over N")
    parser.add_argument("--step", choices=("before", "after"), help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        anyio.run(one_run, args.step, args.count, args.concurrency)
    elif args.callgrind:
        callgrind(args.callgrind)
    else:
        anyio.run(main, args.count, args.rounds, args.postgres)
