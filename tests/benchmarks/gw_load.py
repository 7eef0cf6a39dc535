"""Raw-socket load client for the gateway benchmark; runs in its own process.

Raw sockets (an ``asyncio.Protocol``, no HTTP client library) so no client pool is
measured, and every ``recv`` is timestamped where it lands (``data_received``): that is
what makes coalesced SSE events visible. Commands (each prints one JSON object):

- ``latency URL --n N``: N sequential non-streaming requests on one keep-alive
  connection; per-request latency in ns.
- ``stream URL --n N --gap-ms G``: N sequential streams; time to headers, time to first
  content event, per-event arrival times, and the number of distinct reads that carried
  content events (equal to the event count unless events were coalesced).
- ``hold URL --steps 100,500,1000``: open streams step by step (waiting until each has
  its first event), print ``STEP <open>`` and wait for a line on stdin before the next
  step; then close them all.
- ``rps URL --c C --d SECONDS``: closed-loop throughput (fallback when wrk is missing;
  one Python process tops out far below wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from typing import cast
from urllib.parse import urlsplit

__all__ = ["request_bytes"]

_PROMPT = [{"role": "user", "content": "Say hello to the benchmark, briefly please."}]


def request_bytes(url: str, *, stream: bool, key: str, model: str = "bench") -> bytes:
    """One pre-encoded HTTP/1.1 keep-alive request."""
    parts = urlsplit(url)
    payload: dict[str, object] = {"model": model, "messages": _PROMPT, "max_tokens": 64}
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    body = json.dumps(payload, separators=(",", ":")).encode()
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nAccept: */*\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Response:
    """Incremental HTTP/1.1 response parser that timestamps SSE events."""

    def __init__(self, t_sent: int) -> None:
        self.t_sent = t_sent
        self.status = 0
        self.t_head = 0
        self.head_done = False
        self.chunked = False
        self.remaining = 0  # content-length left, or bytes left in the current chunk
        self.chunk_state = "size"  # size | data | crlf | trailer
        self.sse = b""
        self.events: list[int] = []  # arrival time of each content event
        self.arrivals = 0  # reads that carried at least one content event
        self.other_events = 0
        self.body_bytes = 0
        self.done = False

    def feed(self, buf: bytearray, now: int, read_id: int) -> None:
        got_event = False
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).split(b"\r\n")
            del buf[: end + 4]
            self.status = int(head[0].split(b" ", 2)[1])
            self.t_head = now
            self.head_done = True
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.remaining = int(value.strip())
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.chunked = True
            if not self.chunked and self.remaining == 0:
                self.done = True
                return
        if not self.chunked:
            take = min(self.remaining, len(buf))
            got_event = self._body(bytes(buf[:take]), now)
            del buf[:take]
            self.remaining -= take
            self.done = self.remaining == 0
        else:
            while buf and not self.done:
                if self.chunk_state == "size":
                    end = buf.find(b"\r\n")
                    if end < 0:
                        break
                    size = int(bytes(buf[:end]).split(b";")[0], 16)
                    del buf[: end + 2]
                    self.remaining = size
                    self.chunk_state = "data" if size else "trailer"
                elif self.chunk_state == "data":
                    take = min(self.remaining, len(buf))
                    got_event = self._body(bytes(buf[:take]), now) or got_event
                    del buf[:take]
                    self.remaining -= take
                    if self.remaining == 0:
                        self.chunk_state = "crlf"
                elif self.chunk_state == "crlf":
                    if len(buf) < 2:
                        break
                    del buf[:2]
                    self.chunk_state = "size"
                else:  # trailer: no trailers expected, just the final CRLF
                    if len(buf) < 2:
                        break
                    del buf[:2]
                    self.done = True
        if got_event:
            self.arrivals += 1

    def _body(self, data: bytes, now: int) -> bool:
        self.body_bytes += len(data)
        self.sse += data
        got = False
        while True:
            end = self.sse.find(b"\n\n")
            if end < 0:
                return got
            event = self.sse[:end]
            self.sse = self.sse[end + 2 :]
            if b'"content":"token' in event:
                self.events.append(now)
                got = True
            else:
                self.other_events += 1


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.response: _Response | None = None
        self.waiter: asyncio.Future[_Response] | None = None
        self.first_event: asyncio.Future[None] | None = None
        self.reads = 0
        self.closing = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.first_event is not None and not self.first_event.done():
            self.first_event.set_result(None)
        if self.closing:
            return
        if self.response is not None and self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost mid-response"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self.reads += 1
        self.buf += data
        response = self.response
        if response is None:
            return
        response.feed(self.buf, now, self.reads)
        if response.events and self.first_event is not None and not self.first_event.done():
            self.first_event.set_result(None)
        if response.done and self.waiter is not None and not self.waiter.done():
            self.response = None
            self.waiter.set_result(response)

    def close(self) -> None:
        """Hang up on purpose (no error for the response in flight)."""
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> asyncio.Future[_Response]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.first_event = loop.create_future()
        self.response = _Response(time.perf_counter_ns())
        self.transport.write(data)
        return self.waiter


async def _connect(url: str) -> _Conn:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(_Conn, parts.hostname or "127.0.0.1", parts.port or 80)
    return conn


async def cmd_latency(url: str, n: int, key: str) -> dict[str, object]:
    conn = await _connect(url)
    data = request_bytes(url, stream=False, key=key)
    lat: list[int] = []
    errors = 0
    for _ in range(n):
        resp = await conn.send(data)
        if resp.status != 200:
            errors += 1
        lat.append(time.perf_counter_ns() - resp.t_sent)
    conn.close()
    return {"lat_ns": lat, "errors": errors}


async def cmd_stream(url: str, n: int, key: str) -> dict[str, object]:
    conn = await _connect(url)
    data = request_bytes(url, stream=True, key=key)
    streams = []
    for _ in range(n):
        resp = await conn.send(data)
        streams.append(
            {
                "status": resp.status,
                "head_ns": resp.t_head - resp.t_sent,
                "events_ns": [t - resp.t_sent for t in resp.events],
                "arrivals": resp.arrivals,
                "other_events": resp.other_events,
            }
        )
    conn.close()
    return {"streams": streams}


async def cmd_hold(url: str, steps: list[int], key: str) -> dict[str, object]:
    data = request_bytes(url, stream=True, key=key, model="bench-hold")
    conns: list[_Conn] = []
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    failed = 0
    for target in steps:
        batch: list[_Conn] = []
        while len(conns) + len(batch) < target:
            conn = await _connect(url)
            conn.send(data)
            batch.append(conn)
        firsts = [c.first_event for c in batch if c.first_event is not None]
        if firsts:
            await asyncio.wait(firsts, timeout=20.0)
        failed += sum(1 for c in batch if c.response is None or not c.response.events)
        conns.extend(batch)
        sys.stdout.write(f"STEP {len(conns)} {failed}\n")
        sys.stdout.flush()
        await reader.readline()
    for conn in conns:
        conn.close()
    await asyncio.sleep(0.2)
    return {"opened": len(conns), "failed_first_event": failed}


async def cmd_rps(url: str, c: int, seconds: float, key: str) -> dict[str, object]:
    data = request_bytes(url, stream=False, key=key)
    deadline = time.perf_counter() + seconds
    lat: list[int] = []
    errors = 0

    async def worker() -> None:
        nonlocal errors
        conn = await _connect(url)
        while time.perf_counter() < deadline:
            resp = await conn.send(data)
            if resp.status != 200:
                errors += 1
            lat.append(time.perf_counter_ns() - resp.t_sent)
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat),
        "rps": len(lat) / elapsed,
        "p50_us": lat[len(lat) // 2] / 1000 if lat else 0,
        "p99_us": lat[int(len(lat) * 0.99)] / 1000 if lat else 0,
        "errors": errors,
        "elapsed": elapsed,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gw_load")
    parser.add_argument("command", choices=["latency", "stream", "hold", "rps"])
    parser.add_argument("url")
    parser.add_argument("--key", default="none")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", default="100,500,1000")
    parser.add_argument("--c", type=int, default=16)
    parser.add_argument("--d", type=float, default=5.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args(argv)
    if args.command == "latency":
        coro = cmd_latency(args.url, args.n, args.key)
    elif args.command == "stream":
        coro = cmd_stream(args.url, args.n, args.key)
    elif args.command == "hold":
        coro = cmd_hold(args.url, [int(s) for s in args.steps.split(",")], args.key)
    else:
        coro = cmd_rps(args.url, args.c, args.d, args.key)
    if args.loop == "uvloop":
        result = importlib.import_module("uvloop").run(coro)
    else:
        result = asyncio.run(coro)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
