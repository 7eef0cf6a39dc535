"""In-process cost of gatewaykit's own code path ("mock transport"; perf-study §6.1 mode 2).

No sockets: the upstream is an ``httpx.MockTransport`` returning the fake provider's
bytes, and requests are driven straight into the ASGI app with a raw ASGI driver, so the
figure is gatewaykit's own per-request and per-event cost, far less noisy than socket
runs on a shared box. Never compare these numbers with the socket benchmark's.

``python -m tests.benchmarks.gw_micro [--n 2000] [--profile]`` prints µs per request
(non-streaming) and per stream / per event (streaming) for the passthroughs and gatewaykit
on an in-memory and a file SQLite ledger, and with ``--profile`` a cProfile breakdown of
gatewaykit's functions (µs per request, inclusive). The native mock client answers behind
gatewaykit's own ``UpstreamClient`` protocol, so "passthrough (native mock client)" and
"gateway, SQLite :memory:" differ only in what gatewaykit adds; the httpx mock transport
rows show the httpx path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib
import json
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp, Message

from tests.benchmarks import gw_fake, gw_gateway, gw_server
from tests.benchmarks.gw_load import request_bytes

__all__ = ["main"]

UPSTREAM = "http://fake.invalid/v1"
EVENTS = 32


def mock_client() -> httpx.AsyncClient:
    """An httpx client whose transport answers like the fake provider, without sockets."""

    async def events() -> AsyncIterator[bytes]:
        for _ in range(EVENTS):
            yield _payload(gw_fake._EVENT)
        yield _payload(gw_fake._FINISH) + _payload(gw_fake._USAGE) + _payload(gw_fake._DONE)

    def handler(request: httpx.Request) -> httpx.Response:
        if b'"stream":true' in request.content.replace(b" ", b""):
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=events()
            )
        return httpx.Response(
            200, headers={"content-type": "application/json"}, content=gw_fake._COMPLETION
        )

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


class _NativeResponse:
    """A canned answer behind gatewaykit's UpstreamClient protocol (no sockets)."""

    def __init__(self, stream: bool) -> None:
        self.status = 200
        kind = b"text/event-stream" if stream else b"application/json"
        self.raw_headers = [(b"content-type", kind)]
        self.headers = {"content-type": kind.decode()}
        self._stream = stream

    async def read(self, limit: int) -> bytes:
        return gw_fake._COMPLETION

    async def chunks(self) -> AsyncIterator[bytes]:
        for _ in range(EVENTS):
            yield _payload(gw_fake._EVENT)
        yield _payload(gw_fake._FINISH) + _payload(gw_fake._USAGE) + _payload(gw_fake._DONE)

    async def aclose(self) -> None:
        return None


class NativeMockClient:
    """gatewaykit's UpstreamClient answering like the fake provider, without sockets."""

    async def request(
        self, method: str, url: str, *, body: bytes, headers: Any, timeouts: Any
    ) -> _NativeResponse:
        return _NativeResponse(b'"stream":true' in body.replace(b" ", b""))

    async def __aenter__(self) -> NativeMockClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def passthrough_native(upstream: str, client: NativeMockClient) -> ASGIApp:
    """The floor's shape (Starlette route, bytes streamed through) on the same mock client."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def proxy(request: Request) -> Response:
        body = await request.body()
        resp = await client.request(
            "POST", upstream + "/chat/completions", body=body, headers={}, timeouts=None
        )
        ctype = resp.headers["content-type"]
        if ctype.startswith("text/event-stream"):
            return StreamingResponse(resp.chunks(), status_code=resp.status, media_type=ctype)
        data = await resp.read(1 << 26)
        await resp.aclose()
        return Response(data, status_code=resp.status, media_type=ctype)

    return Starlette(routes=[Route("/v1/chat/completions", proxy, methods=["POST"])])


def _payload(chunk: bytes) -> bytes:
    """The data of one HTTP chunk built by gw_fake (size line and CRLFs removed)."""
    return chunk.split(b"\r\n", 1)[1][:-2]


async def drive(app: ASGIApp, raw: bytes) -> list[Message]:
    """One request through the ASGI app; the client never disconnects."""
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    headers = [
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(b":") for line in lines[1:])
    ]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    never = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop()
        await never.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def _lifespan_run(app: Any, body: Callable[[], Awaitable[None]]) -> None:
    async with app.router.lifespan_context(app):
        await body()


async def measure(app: Any, raw: bytes, n: int) -> tuple[float, float]:
    """Median wall and CPU (whole process, all threads) µs per request over 5 batches.

    CPU time is the robust figure on a shared box; wall time adds the waits (thread
    hops to the ledger, fsync) and whatever the other tenants cost.
    """
    batches: list[tuple[float, float]] = []

    async def body() -> None:
        for _ in range(50):
            await drive(app, raw)
        sent = await drive(app, raw)
        status = next(m["status"] for m in sent if m["type"] == "http.response.start")
        assert status == 200, sent
        per = max(1, n // 5)
        for _ in range(5):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(per):
                await drive(app, raw)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            batches.append((wall / per * 1e6, cpu / per * 1e6))

    await _lifespan_run(app, body)
    return (
        statistics.median(b[0] for b in batches),
        statistics.median(b[1] for b in batches),
    )


def apps(tmpdir: str, key: str) -> dict[str, Callable[[], Any]]:
    def gateway(target: str, variant: str = "", client: Any = None) -> Any:
        return gw_gateway.gateway_app(
            "gateway-sqlite",
            UPSTREAM,
            {"db": target, "key": key, "variant": variant},
            client=client or NativeMockClient(),
        )

    file_db = gw_gateway.ledger_url("gateway-sqlite", tmpdir, "", fresh=True) or ""
    normal_db = gw_gateway.ledger_url("gateway-sqlite:normal", tmpdir, "", fresh=True) or ""
    made: dict[str, Callable[[], Any]] = {
        "passthrough (native mock client)": lambda: passthrough_native(
            UPSTREAM, NativeMockClient()
        ),
        "passthrough-httpx (mock transport)": lambda: gw_server.passthrough_httpx(
            UPSTREAM, client=mock_client()
        ),
        "gateway, SQLite :memory:": lambda: gateway("sqlite://:memory:"),
        "gateway, SQLite :memory:, httpx mock transport": lambda: gateway(
            "sqlite://:memory:", client=mock_client()
        ),
        "gateway, SQLite :memory:, budget_headers=False": lambda: gateway(
            "sqlite://:memory:", "nohdr"
        ),
        "gateway, SQLite :memory:, RPM + TPM limits in process": lambda: gateway(
            "sqlite://:memory:", "limits"
        ),
        "gateway, SQLite file, synchronous=NORMAL": lambda: gateway(normal_db),
        "gateway, SQLite file (default FULL)": lambda: gateway(file_db),
    }
    return made


async def _count(app: Any, raw: bytes, n: int) -> None:
    async def body() -> None:
        for _ in range(20 + n):
            await drive(app, raw)

    await _lifespan_run(app, body)


def _parts() -> dict[str, Callable[[], Awaitable[None]]]:
    """Pieces of gatewaykit's per-request and per-event work, to cost one at a time."""
    import anyio

    from gatewaykit.adapters.openai_chat import ChatStreamUsage
    from gatewaykit.adapters.sse import SSESplitter

    never = anyio.Event()
    event = _payload(gw_fake._EVENT)

    async def waiter() -> None:
        await never.wait()

    async def one_task() -> None:  # the adapter's per-request disconnect watcher
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.cancel_scope.cancel()

    async def two_tasks() -> None:  # the middleware's disconnect watcher + heartbeat
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            tg.start_soon(anyio.sleep, 3600)
            tg.cancel_scope.cancel()

    async def asyncio_task() -> None:  # reference: a bare asyncio task, cancelled
        task = asyncio.get_running_loop().create_task(never.wait())
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def shield() -> None:
        with anyio.CancelScope(shield=True):  # noqa: ASYNC100 -- costing the scope itself
            pass

    async def fail_after_none() -> None:  # _Exchange._attempt's fail_after(None)
        with anyio.fail_after(None):  # noqa: ASYNC100 -- costing the scope itself
            pass

    splitter, extractor = SSESplitter(), ChatStreamUsage()

    async def sse_event() -> None:  # per streamed event: split + usage extraction
        for item in splitter.feed(event):
            extractor.observe(item)

    async def sse_split_only() -> None:
        splitter.feed(event)

    return {
        "anyio task group + 1 task, cancelled": one_task,
        "anyio task group + 2 tasks, cancelled": two_tasks,
        "asyncio task, cancelled (reference)": asyncio_task,
        "anyio CancelScope(shield=True)": shield,
        "anyio fail_after(None)": fail_after_none,
        "SSE event: split + ChatStreamUsage.observe": sse_event,
        "SSE event: split only": sse_split_only,
    }


async def _run_part(name: str, n: int) -> float:
    fn = _parts()[name]
    for _ in range(100):
        await fn()
    t0 = time.thread_time()
    for _ in range(n):
        await fn()
    return (time.thread_time() - t0) / max(n, 1) * 1e6


def _instructions(what: list[str], count: int, stream: bool) -> tuple[int, int]:
    """Instructions of (the event loop's thread, every other thread) in one child run.

    Counted per thread: the total over all threads moves with wall time (the ledger
    writer's waits for the GIL and its idle checks run longer on a busy box), while
    each thread's own count repeats within about 1 %.
    """
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            "valgrind", "--tool=callgrind", "--separate-threads=yes",
            f"--callgrind-out-file={out}/cg.%p",
            sys.executable, "-m", "tests.benchmarks.gw_micro", *what,
            "--count", str(count), *(["--stream"] if stream else []),
        ]  # fmt: skip
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        counts: dict[int, int] = {}
        for path in Path(out).glob("cg.*-*"):
            thread = int(path.name.rsplit("-", 1)[1])
            text = path.read_text(errors="replace")
            match = re.search(r"^summary: (\d+)", text, re.MULTILINE)
            assert match, path
            counts[thread] = int(match.group(1))
    loop = counts.pop(1)
    return loop, sum(counts.values())


def callgrind(names: list[str], n: int, stream: bool | None) -> dict[str, float]:
    """Instructions per request under valgrind (deterministic, immune to other tenants).

    Runs with 0 and ``n`` measured requests (or calls of a part); the difference divided
    by ``n`` cancels interpreter start-up and imports. Parts share one baseline. Printed
    for the event loop's thread and for the other threads (the SQLite ledger's writer).
    """
    out: dict[str, float] = {}
    base: tuple[int, int] | None = None
    for name in names:
        what = ["--part", name] if stream is None else ["--app", name]
        if base is None or stream is not None:
            base = _instructions(what, 0, bool(stream))
        loop, others = _instructions(what, n, bool(stream))
        per_loop, per_others = (loop - base[0]) / n, (others - base[1]) / n
        out[name] = per_loop + per_others
        kind = "call" if stream is None else "stream" if stream else "request"
        print(
            f"{name:48s} {out[name] / 1e3:9.1f} k instructions per {kind} "
            f"(loop thread {per_loop / 1e3:.1f} k, other threads {per_others / 1e3:.1f} k)",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gw_micro")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--only", default="", help="run only apps whose name contains this")
    parser.add_argument("--callgrind", type=int, default=0, help="count instructions over N")
    parser.add_argument("--parts", action="store_true", help="cost the pieces one by one")
    parser.add_argument("--app", help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        run: Callable[[Any], Any] = importlib.import_module("uvloop").run
    except ImportError:
        run = asyncio.run
    if args.part:  # one child run under valgrind
        run(_run_part(args.part, args.count))
        return
    if args.parts:
        names = _select(list(_parts()), args.only)
        if args.callgrind:
            callgrind(names, args.callgrind, stream=None)
            return
        for name in names:
            cpu = statistics.median(run(_run_part(name, args.n)) for _ in range(5))
            print(f"{name:48s} {cpu:7.2f} µs thread CPU per call", flush=True)
        return
    if args.callgrind:
        with tempfile.TemporaryDirectory() as tmpdir:
            names = _select(list(apps(tmpdir, "gk_x_y")), args.only)
        callgrind(names, args.callgrind, stream=False)
        callgrind(names, args.callgrind, stream=True)
        return
    if args.app:  # one child run under valgrind
        with tempfile.TemporaryDirectory() as tmpdir:
            key = gw_gateway.new_key()
            url = UPSTREAM + "/chat/completions"
            run(
                _count(
                    apps(tmpdir, key)[args.app](),
                    request_bytes(url, stream=args.stream, key=key),
                    args.count,
                )
            )
        return
    with tempfile.TemporaryDirectory() as tmpdir:
        key = gw_gateway.new_key()
        table = apps(tmpdir, key)
        plain = request_bytes(UPSTREAM + "/chat/completions", stream=False, key=key)
        stream = request_bytes(UPSTREAM + "/chat/completions", stream=True, key=key)
        results: dict[str, dict[str, float]] = {}
        for name, make in table.items():
            if name not in _select(list(table), args.only):
                continue
            req_wall, req_cpu = run(measure(make(), plain, args.n))
            st_wall, st_cpu = run(measure(make(), stream, max(100, args.n // 10)))
            results[name] = {
                "request_wall_us": req_wall,
                "request_cpu_us": req_cpu,
                "stream_wall_us": st_wall,
                "stream_cpu_us": st_cpu,
            }
            print(
                f"{name:48s} request: {req_cpu:7.1f} µs CPU ({req_wall:7.1f} wall)  "
                f"stream of {EVENTS}: {st_cpu:7.1f} µs CPU ({st_wall:7.1f} wall)",
                flush=True,
            )
        if args.profile:
            for name, raw in (("request", plain), ("stream", stream)):
                target = "gateway, SQLite :memory:"
                # Thread CPU time, not wall time: robust to the other tenants of the box.
                profiler = cProfile.Profile(time.thread_time)
                n = args.n if name == "request" else max(100, args.n // 10)

                async def profiled(
                    app: Any, raw: bytes = raw, n: int = n, profiler: cProfile.Profile = profiler
                ) -> None:
                    async def body() -> None:
                        for _ in range(50):
                            await drive(app, raw)
                        profiler.enable()
                        for _ in range(n):
                            await drive(app, raw)
                        profiler.disable()

                    await _lifespan_run(app, body)

                run(profiled(table[target]()))
                print(f"\n-- cProfile (thread CPU), {target}, {name}: µs per {name} --")
                _print_profile(profiler, n, only="gatewaykit")
                print("\n-- the same, every function, by self time --")
                _print_profile(profiler, n, by_self=True, top=30)
        print(json.dumps(results))


def _select(names: list[str], only: str) -> list[str]:
    """``--only``: the name given exactly, else every name containing it."""
    return [only] if only in names else [n for n in names if only in n]


def _print_profile(
    profiler: cProfile.Profile, n: int, *, only: str = "", by_self: bool = False, top: int = 45
) -> None:
    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_cc, calls, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if only not in filename:
            continue
        short = "/".join(filename.split("/")[-2:])
        rows.append((ct / n * 1e6, tt / n * 1e6, calls / n, f"{short}:{line} {func}"))
    rows.sort(key=lambda r: r[1] if by_self else r[0], reverse=True)
    print(f"{'incl µs':>9} {'self µs':>8} {'calls':>6}  function")
    for incl, own, calls, where in rows[:top]:
        print(f"{incl:9.1f} {own:8.1f} {calls:6.1f}  {where}")


if __name__ == "__main__":
    main()
