"""Enqueue throughput of the SQLite outbox (group commit), not part of the test run.

.venv/bin/python -m tests.platform.bench_outbox [COUNT]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import anyio

from gatewaykit.outbox import SQLiteOutbox


async def measure(synchronous: str, count: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        async with SQLiteOutbox(str(Path(tmp) / "o.db"), synchronous=synchronous) as box:

            async def one(n: int) -> None:
                await box.enqueue(f"req_{n}:att_1", {"request_id": f"req_{n}", "usage": None})

            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for n in range(count):
                    tg.start_soon(one, n)
            return count / (time.perf_counter() - started)


async def main(count: int) -> None:
    for synchronous in ("FULL", "NORMAL"):
        rate = await measure(synchronous, count)
        print(f"synchronous={synchronous}: {rate:,.0f} enqueues/s ({count} concurrent)")


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
