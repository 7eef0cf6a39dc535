"""What rate limits add to a request: the limiter alone, and the whole in-process gateway.

``python -m tests.benchmarks ratelimit [--n 2000] [--redis URL]`` (``nox -s bench --
ratelimit``) prints:

* **the limiter alone** — µs of this process's CPU per ``acquire`` + ``settle`` (a key
  with an RPM and a TPM), wall µs per call, and Redis commands per check counted by the
  server (``INFO commandstats``): one ``EVALSHA`` is one round trip;
* **the gateway** — gw_micro's quiet in-process harness (raw ASGI driver, mock upstream,
  SQLite ``:memory:``): CPU µs per non-streaming request with no limits, with limits in
  process, and with limits in Redis, and what the limits add as a share of the request.

Runs for about 20 s. Figures on a shared box are noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

from gatewaykit.ratelimit import InProcessRateLimiter, RateLimit, RateLimiter
from tests.benchmarks import gw_gateway, gw_micro
from tests.benchmarks.gw_load import request_bytes

__all__ = ["main"]

REDIS_URL = os.environ.get("GATEWAYKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def _limiter_cost(limiter: RateLimiter, n: int) -> tuple[float, float]:
    """Median (CPU µs, wall µs) per acquire + settle over 5 batches."""
    limits = [RateLimit(f"key:bench-{os.getpid()}", rpm=10**9, tpm=10**9)]
    batches = []
    for batch in range(6):
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            request_id = f"r{batch}-{i}"
            await limiter.acquire(request_id, limits, 100)
            await limiter.settle(request_id, limits, 40)
        batches.append(((time.process_time() - c0) / n * 1e6, (time.perf_counter() - t0) / n * 1e6))
    batches = batches[1:]  # the first warms up (script load, connections)
    return statistics.median(b[0] for b in batches), statistics.median(b[1] for b in batches)


async def _commands_per_check(limiter: Any, n: int) -> float:
    async def evalsha_calls() -> int:
        stats = await limiter.client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    limits = [RateLimit("key:bench-count", rpm=10**9, tpm=10**9)]
    await limiter.acquire("warm", limits, 1)
    before = await evalsha_calls()
    for i in range(n):
        await limiter.acquire(f"c{i}", limits, 1)
    return (await evalsha_calls() - before) / n


async def limiter_rows(n: int, redis_url: str) -> None:
    print("limiter alone (acquire + settle, one key with RPM and TPM)")
    cpu, wall = await _limiter_cost(InProcessRateLimiter(), n)
    print(f"  in-process           {cpu:7.2f} µs CPU  {wall:7.2f} µs wall")
    from gatewaykit.ratelimit.redis import RedisRateLimiter

    async with RedisRateLimiter.from_url(redis_url, prefix="gk_bench:") as redis:
        cpu, wall = await _limiter_cost(redis, max(n // 4, 200))
        per_check = await _commands_per_check(redis, 200)
        print(
            f"  Redis                {cpu:7.2f} µs CPU  {wall:7.2f} µs wall  "
            f"{per_check:.2f} EVALSHA per check (settle: one more)"
        )
        async for key in redis.client.scan_iter(match="gk_bench:*"):
            await redis.client.delete(key)


def gateway_rows(n: int, redis_url: str) -> None:
    print("gateway, SQLite :memory:, non-streaming request (gw_micro harness)")
    key = gw_gateway.new_key()
    raw = request_bytes(gw_micro.UPSTREAM + "/chat/completions", stream=False, key=key)
    rows: dict[str, float] = {}
    with tempfile.TemporaryDirectory():
        for name, variant in (
            ("no limits", ""),
            ("RPM + TPM in process", "limits"),
            ("RPM + TPM in Redis", "redis"),
        ):
            app = gw_gateway.gateway_app(
                "gateway-sqlite",
                gw_micro.UPSTREAM,
                {"db": "sqlite://:memory:", "key": key, "variant": variant, "redis": redis_url},
                client=gw_micro.NativeMockClient(),
            )
            _, cpu = asyncio.run(gw_micro.measure(app, raw, n))
            rows[name] = cpu
            added = cpu - rows["no limits"]
            share = f"  (+{added:5.1f} µs, {added / rows['no limits']:+.1%})" if variant else ""
            print(f"  {name:22s} {cpu:7.1f} µs CPU per request{share}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench ratelimit")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--redis", default=REDIS_URL)
    args = parser.parse_args(argv)
    asyncio.run(limiter_rows(args.n, args.redis))
    gateway_rows(args.n, args.redis)


if __name__ == "__main__":
    main()
