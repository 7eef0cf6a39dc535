"""How soon a running gateway refuses a key revoked by another ledger instance (the CLI).

``python -m tests.benchmarks keys [--trials N] [--dsn URL]``

A ``StandaloneMode`` with ``key_cache_ttl=3600`` (so the cache's TTL never ends it) on
one ledger instance; a second instance on the same store, as the command line opens it,
creates a key, the gateway caches it, and the second instance revokes it. The window is
from ``revoke_key`` returning (committed) to the gateway's first refusal:

* **busy** — the gateway keeps serving the key: authenticate + reserve + settle, back to
  back, as a request does;
* **idle** — no requests: the time until the gateway's ``key_epoch`` moves, after which
  the first request is refused.

Printed as a Markdown table (median / 90th percentile / max over the trials), SQLite
(file, ``synchronous=FULL``) and PostgreSQL (schema created and dropped here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from gatewaykit.errors import RequestRejected
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord, Ledger
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import ModelPrice
from gatewaykit.upstream import Upstream

__all__ = ["main"]

PRICES = {"m": ModelPrice(Decimal(1), Decimal(1))}
UPSTREAMS = [Upstream("https://example.invalid/v1", api_key="x", provider="openai")]


@contextlib.asynccontextmanager
async def _sqlite() -> AsyncIterator[tuple[Ledger, Ledger]]:
    from gatewaykit.ledger.sqlite import SQLiteLedger

    with tempfile.TemporaryDirectory(prefix="gk-bench-keys-") as tmp:
        path = os.path.join(tmp, "keys.db")
        async with SQLiteLedger(path) as gateway, SQLiteLedger(path) as cli:
            yield gateway, cli


@contextlib.asynccontextmanager
async def _postgres(dsn: str) -> AsyncIterator[tuple[Ledger, Ledger]]:
    import asyncpg

    from gatewaykit.ledger.postgres import PostgresLedger

    schema = f"gk_bench_keys_{secrets.token_hex(4)}"
    conn: Any = await asyncpg.connect(dsn)
    try:
        async with (
            PostgresLedger(dsn, schema=schema, pool_max=2) as gateway,
            PostgresLedger(dsn, schema=schema, pool_max=2) as cli,
        ):
            yield gateway, cli
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


async def _trial(gateway: Ledger, cli: Ledger, mode: StandaloneMode, busy: bool, n: int) -> float:
    new = generate_key()
    await cli.create_key(
        ApiKeyRecord(key_id=new.key_id, key_hash=new.key_hash, prefix=new.prefix, user="u")
    )
    headers = {"authorization": f"Bearer {new.key}"}
    deadline = time.perf_counter() + 5
    while True:  # until the gateway has it (a miss before the creation arrived is cached)
        try:
            await mode.authenticate(headers)
            break
        except RequestRejected:
            assert time.perf_counter() < deadline, "the new key never arrived"
            await asyncio.sleep(0.001)
    # Quiet for a while, revoking at a random phase of SQLite's 0.5 s idle check.
    await asyncio.sleep(random.uniform(0.5, 1.0))
    epoch = getattr(gateway, "key_epoch", None)
    await cli.revoke_key(new.key_id)
    revoked = time.perf_counter()
    i = 0
    while True:
        if busy:
            try:
                await mode.authenticate(headers)
            except RequestRejected:
                return time.perf_counter() - revoked
            hold = f"b{n}-{i}"
            await gateway.reserve(hold, ["user:u"], Decimal("0.001"), ttl=60)
            await gateway.settle(hold, Decimal("0.001"))
            i += 1
        elif getattr(gateway, "key_epoch", None) != epoch:
            return time.perf_counter() - revoked
        else:
            await asyncio.sleep(0.0005)
        assert time.perf_counter() - revoked < 30, "the revocation never arrived"


async def _measure(
    pair: contextlib.AbstractAsyncContextManager[tuple[Ledger, Ledger]], trials: int
) -> dict[str, list[float]]:
    async with pair as (gateway, cli):
        mode = StandaloneMode(gateway, prices=PRICES, upstreams=UPSTREAMS, key_cache_ttl=3600)
        out: dict[str, list[float]] = {"busy": [], "idle": []}
        for n in range(trials):
            for kind in out:
                out[kind].append(await _trial(gateway, cli, mode, kind == "busy", n))
        return out


def _cell(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    return f"{statistics.median(ms):.1f} / {p90:.1f} / {ms[-1]:.1f}"


async def _run(args: argparse.Namespace) -> str:
    rows = []
    for name, pair in (("SQLite (file, FULL)", _sqlite()), ("PostgreSQL", _postgres(args.dsn))):
        try:
            result = await _measure(pair, args.trials)
        except OSError as exc:
            rows.append(f"| {name} | unavailable ({exc}) | |")
            continue
        rows.append(f"| {name} | {_cell(result['busy'])} | {_cell(result['idle'])} |")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"Revocation window, ms from revoke_key's commit to the gateway's first refusal, "
        f"median / p90 / max of {args.trials} trials ({now}; Python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end; key_cache_ttl=3600).\n\n"
        "| ledger | busy gateway | idle gateway |\n| --- | ---: | ---: |\n" + "\n".join(rows)
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks keys")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument(
        "--dsn",
        default=os.environ.get(
            "GATEWAYKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args(argv)
    print(asyncio.run(_run(args)))
    return 0
