"""What each layer of gatewaykit's request path costs, in process, at a given concurrency.

``python -m tests.benchmarks.gw_layers [--c 16] [--n 3000]`` drives the same request
through apps that add one layer at a time, with no sockets and no ledger thread (the
ledger is the in-loop fake of the middleware tests), and prints the event loop thread's
CPU µs per request (the minimum and median of five rounds):

1. the passthrough proxy on the native mock client (the floor's in-process analogue);
2. Starlette with a trivial endpoint that answers canned bytes;
3. the same behind ``GatewayMiddleware`` with a mode that admits without a ledger
   (the middleware's own cost: body, parse, admission and settlement machinery);
4. the same with ``StandaloneMode`` over the in-loop ledger (keys, estimate, holds);
5. the adapter instead of the trivial endpoint (the full gateway path).

The differences between rows are what each layer adds. CPU time of the loop thread,
not wall time: robust to the other tenants of the box. The collector is tuned as
``gatewaykit serve`` tunes it (:func:`gatewaykit.runtime.tune_gc`; ``--gc-default``
leaves CPython's settings).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gatewaykit import GatewayMiddleware, ModelPrice, StandaloneMode, Upstream
from gatewaykit.adapters import gateway_routes
from gatewaykit.context import GatewayContext, get_context
from gatewaykit.keys import display_prefix, hash_key
from gatewaykit.ledger.base import ApiKeyRecord
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.runtime import tune_gc
from gatewaykit.settlement import UnmeteredSettlement
from gatewaykit.usage import Usage
from tests.benchmarks import gw_fake, gw_gateway, gw_micro
from tests.benchmarks.gw_load import request_bytes
from tests.middleware.fake_ledger import FakeLedger

__all__ = ["main"]

PATH = "/v1/chat/completions"


class _CannedEndpoint:
    """Settles (when gated) and answers the fake provider's completion bytes."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if "gatewaykit" in scope:
            settlement = get_context(scope).settlement
            settlement.note_upstream_contacted()
            await settlement.on_success(Usage(input_tokens=10, output_tokens=5))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": gw_fake._COMPLETION})


class _AdmitAll:
    """A mode that admits every request unmetered: the middleware alone."""

    async def resolve(self, request: GatewayRequest) -> GatewayContext:
        return GatewayContext(
            request_id=request.request_id,
            settlement=UnmeteredSettlement(request_id=request.request_id),
            format=request.format,
            model=request.parsed.model,
            stream=request.parsed.stream,
            body=request.body,
        )


def _standalone(ledger: FakeLedger) -> StandaloneMode:
    price = ModelPrice(input_per_mtok=Decimal("2.50"), output_per_mtok=Decimal("10.00"))
    upstream = Upstream(base_url=gw_micro.UPSTREAM, api_key="sk-fake", provider="openai")
    return StandaloneMode(ledger, prices={"bench": price}, upstreams=[upstream])


def _layers(key: str) -> Iterator[tuple[str, ASGIApp, FakeLedger | None]]:
    canned = [Route(PATH, _CannedEndpoint(), methods=["POST"])]
    yield (
        "passthrough (native mock client)",
        gw_micro.passthrough_native(gw_micro.UPSTREAM, gw_micro.NativeMockClient()),
        None,
    )
    yield "Starlette + canned endpoint", Starlette(routes=canned), None
    yield (
        "+ GatewayMiddleware (a mode admitting all)",
        Starlette(routes=canned, middleware=[Middleware(GatewayMiddleware, mode=_AdmitAll())]),
        None,
    )
    ledger = FakeLedger()
    yield (
        "+ StandaloneMode (in-loop ledger)",
        Starlette(
            routes=canned,
            middleware=[Middleware(GatewayMiddleware, mode=_standalone(ledger))],
        ),
        ledger,
    )
    ledger = FakeLedger()
    yield (
        "+ the adapter (the whole gateway path)",
        Starlette(
            routes=gateway_routes(client=gw_micro.NativeMockClient()),
            middleware=[Middleware(GatewayMiddleware, mode=_standalone(ledger))],
        ),
        ledger,
    )


async def _measure(
    app: ASGIApp, ledger: FakeLedger | None, key: str, raw: bytes, c: int, n: int
) -> tuple[float, float]:
    if ledger is not None:
        key_id = key.split("_")[1]
        await ledger.create_key(
            ApiKeyRecord(
                key_id=key_id, key_hash=hash_key(key), prefix=display_prefix(key), user="bench"
            )
        )
        for scope in (f"key:{key_id}", "user:bench"):
            await ledger.set_budget(scope, limit=Decimal(10**6))
    for _ in range(100):
        sent = await gw_micro.drive(app, raw)
    assert sent[0]["status"] == 200, sent
    rounds = []
    for _ in range(5):
        left = n

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await gw_micro.drive(app, raw)

        t0 = time.thread_time()
        await asyncio.gather(*(worker() for _ in range(c)))
        rounds.append((time.thread_time() - t0) / n * 1e6)
    return min(rounds), statistics.median(rounds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gw_layers")
    parser.add_argument("--c", type=int, default=16, help="requests in flight")
    parser.add_argument("--n", type=int, default=3000, help="requests per round")
    parser.add_argument("--gc-default", action="store_true", help="leave the collector as is")
    args = parser.parse_args(argv)
    if not args.gc_default:
        tune_gc()
    key = gw_gateway.new_key()
    raw = request_bytes(gw_micro.UPSTREAM + "/chat/completions", stream=False, key=key)
    run: Callable[[Any], tuple[float, float]] = asyncio.run
    previous = None
    for name, app, ledger in _layers(key):
        low, median = run(_measure(app, ledger, key, raw, args.c, args.n))
        step = "" if previous is None or name.startswith("Starlette") else f"{low - previous:+7.1f}"
        print(f"{name:44s} {low:7.1f} µs (median {median:7.1f})  {step}", flush=True)
        previous = low


if __name__ == "__main__":
    main()
