"""What observability costs per request: metrics and tracing on vs off, in one run.

``nox -s bench -- metrics [--n 3000] [--stream-n 600] [--batch 25]``

In process, no sockets (tests/benchmarks/gw_micro.py's harness): the real middleware,
StandaloneMode on an in-memory SQLite ledger and the adapters, in front of a canned
upstream. The variants (off, metrics, metrics + tracing) run side by side in one event
loop, taking turns in batches, so a noisy neighbour hurts all alike; the figure is
main-thread CPU µs per request (and per stream of 32 events). The goal (issue 13):
metrics on within 5 % of off. A second "off" app is the control: on a busy box two
identical apps differ by several per cent, so the hooks' own cost is also measured alone
(a tight loop of one request's probe and recorder calls) and set against the request.
Numbers from a shared box are noisy; compare the ratios, not the absolute values.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import random
import statistics
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from tests.benchmarks import gw_gateway
from tests.benchmarks.gw_load import request_bytes
from tests.benchmarks.gw_micro import UPSTREAM, NativeMockClient, drive

__all__ = ["main"]

GOAL = 1.05  # metrics on: at most 5 % more CPU per request than off


def variants() -> dict[str, Callable[[], dict[str, Any]]]:
    """Middleware options per variant (made fresh per run: a registry per app)."""

    def metrics() -> dict[str, Any]:
        from gatewaykit.observability import PrometheusMetrics

        return {"metrics": PrometheusMetrics()}

    def multiprocess() -> dict[str, Any]:
        from gatewaykit.observability import MultiprocessPrometheusMetrics

        return {"metrics": MultiprocessPrometheusMetrics()}

    def traced() -> dict[str, Any]:
        from opentelemetry.sdk.trace import TracerProvider

        from gatewaykit.observability import OpenTelemetryTracing

        # An SDK provider with no processor: spans are made and ended, never exported.
        return {**metrics(), "tracing": OpenTelemetryTracing(TracerProvider())}

    return {
        "off": dict,
        "off (control: the same again)": dict,
        "metrics": metrics,
        "metrics (multiprocess class)": multiprocess,
        "metrics + tracing (SDK)": traced,
    }


async def compare(apps: dict[str, Any], raw: bytes, n: int, batch: int) -> dict[str, float]:
    """Main-thread CPU µs per request of each app: the median of alternating batches.

    Every app is alive at once and they take turns (in a new random order every
    round), ``batch`` requests each, so drift (a neighbour's load, frequency changes)
    hits them alike. Thread CPU time leaves out the SQLite writer thread, whose work is
    the same whether metrics are on or off.
    """
    async with contextlib.AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.router.lifespan_context(app))
        for app in apps.values():  # warm up: caches, labelled series, prepared statements
            for _ in range(50):
                await drive(app, raw)
        batches: dict[str, list[float]] = {name: [] for name in apps}
        order = list(apps.items())
        for _ in range(max(1, n // batch)):
            random.shuffle(order)
            for name, app in order:
                t0 = time.thread_time()
                for _ in range(batch):
                    await drive(app, raw)
                batches[name].append((time.thread_time() - t0) / batch * 1e6)
    # The median batch: a neighbour's burst spoils a few batches, not the figure.
    return {name: statistics.median(times) for name, times in batches.items()}


def make_app(key: str, variant: str) -> Any:
    return gw_gateway.gateway_app(
        "gateway-sqlite",
        UPSTREAM,
        {"db": "sqlite://:memory:", "key": key, **variants()[variant]()},
        client=NativeMockClient(),
    )


def hooks_alone(n: int, variant: str) -> float:
    """Main-thread CPU µs of one request's observability calls, without the request.

    The calls GatewayMiddleware and the settlement make when metrics are on (probe and
    the recorder of ``variant``), in a tight loop: a figure the neighbours barely disturb.
    """
    from gatewaykit.context import GatewayContext
    from gatewaykit.observability.probe import Instruments
    from gatewaykit.settlement import RequestEstimate, SettlementOutcome
    from gatewaykit.testing import RecordingSettlement
    from gatewaykit.usage import Usage

    instruments = Instruments(variants()[variant]()["metrics"], None)
    estimate = RequestEstimate(prompt_tokens=10, max_output_tokens=100, amount=Decimal("0.001"))
    outcome = SettlementOutcome("success", Decimal("0.000123"), Usage(10, 20), refunded=False)
    route, headers = "/v1/chat/completions", {"authorization": "Bearer x"}

    def one() -> None:
        settlement = RecordingSettlement(estimate=estimate)
        context = GatewayContext("req", settlement, None, "bench", False, {})
        probe = instruments.start(route, headers)
        probe.activate()
        probe.admitting()
        probe.admitted(context)
        probe.settling()
        probe.settled(outcome)
        probe.first_byte()
        probe.finished(200)

    def loop(with_probe: bool) -> float:
        t0 = time.thread_time()
        for _ in range(n):
            if with_probe:
                one()
            else:  # the objects a request makes anyway, to subtract
                GatewayContext("req", RecordingSettlement(estimate=estimate), None, "b", False, {})
        return time.thread_time() - t0

    loop(True)
    return (min(loop(True) for _ in range(5)) - min(loop(False) for _ in range(5))) / n * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench metrics")
    parser.add_argument("--n", type=int, default=3000, help="requests per variant")
    parser.add_argument("--stream-n", type=int, default=600, help="streams per variant")
    parser.add_argument("--batch", type=int, default=25)
    args = parser.parse_args(argv)
    try:
        run: Callable[[Any], Any] = importlib.import_module("uvloop").run
    except ImportError:
        run = asyncio.run
    key = gw_gateway.new_key()
    url = UPSTREAM + "/chat/completions"
    loads = {
        "request": (request_bytes(url, stream=False, key=key), args.n),
        "stream": (request_bytes(url, stream=True, key=key), args.stream_n),
    }
    print("main-thread CPU µs per request, variants interleaved (a shared box: noisy)")
    off_request = 0.0
    for load, (raw, n) in loads.items():
        names = list(variants())
        random.shuffle(names)  # the order apps are made in shows in their figures
        made = {name: make_app(key, name) for name in names}
        apps = {name: made[name] for name in variants()}
        cpu = run(compare(apps, raw, n, min(args.batch, n)))
        off = cpu["off"]
        off_request = off_request or off
        for name, value in cpu.items():
            ratio = value / off
            print(f"  {load:8s} {name:30s} {value:8.1f} µs  ×{ratio:5.3f}", flush=True)
    for variant in ("metrics", "metrics (multiprocess class)"):
        alone = hooks_alone(args.n, variant)
        share = alone / off_request
        verdict = "within" if share <= GOAL - 1 else "OVER"
        print(
            f"{variant} hooks alone: {alone:.1f} µs per request = {share:.1%} of a request "
            f"with metrics off ({verdict} the 5 % goal)"
        )


if __name__ == "__main__":
    main()
