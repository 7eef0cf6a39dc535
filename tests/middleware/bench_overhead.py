"""Per-request cost of GatewayMiddleware, measured with raw ASGI calls (no network, no upstream).

    .venv/bin/python -m tests.middleware.bench_overhead [N]

Prints µs per request for: the bare app; the middleware with a no-op mode (the
middleware's own work: body, parsing, watcher task, settlement); StandaloneMode on an
in-memory SQLiteLedger with and without budget headroom headers. Not collected by pytest.
"""

from __future__ import annotations

import json
import sys
import time
from decimal import Decimal
from typing import Any

import anyio

from gatewaykit import GatewayMiddleware, Usage, get_settlement
from gatewaykit.context import GatewayContext
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.modes.base import GatewayRequest
from gatewaykit.modes.standalone import StandaloneMode
from gatewaykit.pricing import ModelPrice
from gatewaykit.testing import RecordingSettlement
from gatewaykit.upstream import Upstream

BODY = json.dumps(
    {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
).encode()


async def inner(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    if "gatewaykit" in scope:
        await get_settlement(scope).on_success(Usage(1, 1))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class NoopMode:
    async def resolve(self, request: GatewayRequest) -> GatewayContext:
        return GatewayContext(
            request.request_id,
            RecordingSettlement(),
            request.format,
            request.parsed.model,
            request.parsed.stream,
            request.body,
        )


async def per_request_us(app: Any, key: str, n: int, concurrency: int) -> float:
    headers = [(b"authorization", f"Bearer {key}".encode())]

    async def one() -> None:
        pending = [{"type": "http.request", "body": BODY, "more_body": False}]
        done = anyio.Event()

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
                 "headers": headers, "root_path": ""}  # fmt: skip
        await app(scope, receive, send)

    start = time.perf_counter()
    for _ in range(n // concurrency):
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(one)
    return (time.perf_counter() - start) / n * 1e6


async def main(n: int) -> None:
    async with SQLiteLedger(":memory:") as ledger:
        new = generate_key()
        await ledger.create_key(ApiKeyRecord(new.key_id, new.key_hash, new.prefix, "u"))
        variants: list[tuple[str, Any]] = [
            ("bare app", inner),
            ("middleware, no-op mode", GatewayMiddleware(inner, mode=NoopMode())),
        ]
        for headers_on in (False, True):
            mode = StandaloneMode(
                ledger,
                prices={"m": ModelPrice(Decimal(1), Decimal(2))},
                upstreams=[Upstream("http://upstream.invalid/v1")],
                budget_headers=headers_on,
            )
            label = f"standalone + SQLite :memory:, budget_headers={headers_on}"
            variants.append((label, GatewayMiddleware(inner, mode=mode)))
        for label, app in variants:
            for concurrency in (1, 16):
                await per_request_us(app, new.key, max(n // 10, 16), concurrency)  # warm up
                us = await per_request_us(app, new.key, n, concurrency)
                print(f"{label:55} c={concurrency:<3} {us:8.0f} µs/request")


if __name__ == "__main__":
    anyio.run(main, int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
