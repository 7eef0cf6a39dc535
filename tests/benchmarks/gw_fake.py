"""A fast fake OpenAI-compatible provider for the gateway benchmark (raw asyncio protocol).

It must be much faster than any Starlette app (the run is flagged when it is not at
least 3x faster than the gateway), so it is a bare ``asyncio.Protocol`` HTTP/1.1
keep-alive server with pre-encoded responses:

- ``POST .../chat/completions`` without ``"stream": true``: a fixed ~600-byte completion
  with ``usage``.
- with ``"stream": true``: ``--events`` content chunks ``--gap-ms`` apart (the first after
  ``--first-delay-ms``), a finish chunk, a usage chunk when ``include_usage`` was asked
  for, then ``data: [DONE]`` -- chunked transfer encoding, like the real providers.
- model ``bench-hold``, streaming: one event at once, then one a second until the client
  goes away (or ``--hold-s`` passes); used for the memory-per-open-stream test.

Run: ``python -m tests.benchmarks.gw_fake --port 0`` prints ``READY <port>``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from typing import cast

__all__ = ["FakeConfig", "serve"]

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "bench",
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "The quick brown fox jumps over the lazy dog. " * 6,
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 60,
            "total_tokens": 72,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    },
    separators=(",", ":"),
).encode()


def _chunk(obj: dict[str, object]) -> bytes:
    """One SSE event as one HTTP chunk."""
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _delta(content: str, finish: str | None = None) -> dict[str, object]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "bench",
        "system_fingerprint": "fp_bench",
        "choices": [
            {"index": 0, "delta": {"content": content}, "logprobs": None, "finish_reason": finish}
        ],
        # What OpenAI sends in every chunk of a stream that asked for usage (gatewaykit
        # always asks): the usage reader must not mistake it for a usage chunk.
        "usage": None,
    }


_EVENT = _chunk(_delta("token "))
_FINISH = _chunk(_delta("", "stop"))
_USAGE = _chunk(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "bench",
        "choices": [],
        "usage": {"prompt_tokens": 12, "completion_tokens": 64, "total_tokens": 76},
    }
)
_DONE = b"%x\r\n%s\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")
_END = b"0\r\n\r\n"

_JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nx-request-id: req_bench\r\n\r\n" % len(_COMPLETION)
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\nx-request-id: req_bench\r\n\r\n"
)
_NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
)


class FakeConfig:
    """Knobs for the stream shape."""

    def __init__(
        self,
        *,
        events: int = 32,
        gap_ms: float = 10.0,
        first_delay_ms: float = 0.0,
        hold_s: float = 120.0,
    ) -> None:
        self.events = events
        self.gap = gap_ms / 1000.0
        self.first_delay = first_delay_ms / 1000.0
        self.hold_s = hold_s


class _Protocol(asyncio.Protocol):
    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.streaming: asyncio.TimerHandle | None = None
        self.pending: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.streaming is not None:
            self.streaming.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._process()

    def _process(self) -> None:
        # One request at a time: while a stream is going out, later (pipelined) requests wait.
        while self.streaming is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            total = end + 4 + length
            if len(self.buf) < total:
                return
            body = self.buf[end + 4 : total]
            self.buf = self.buf[total:]
            self._respond(head.split(b" ", 2)[1], body)

    def _respond(self, target: bytes, body: bytes) -> None:
        assert self.transport is not None
        if not target.split(b"?", 1)[0].endswith(b"/chat/completions"):
            self.transport.write(_NOT_FOUND)
            return
        compact = body.replace(b" ", b"")
        if b'"stream":true' not in compact:
            self.transport.write(_JSON_HEAD + _COMPLETION)
            return
        loop = asyncio.get_running_loop()
        self.transport.write(_SSE_HEAD)
        if b'"model":"bench-hold"' in compact:
            self._hold(loop, loop.time() + self.config.hold_s)
            return
        tail = _FINISH + (_USAGE if b'"include_usage":true' in compact else b"") + _DONE + _END
        t0 = loop.time() + self.config.first_delay
        self._event(loop, t0, 0, tail)

    def _event(self, loop: asyncio.AbstractEventLoop, t0: float, k: int, tail: bytes) -> None:
        assert self.transport is not None
        if self.closed:
            return
        if k == 0 and self.config.first_delay > 0 and loop.time() < t0:
            self.streaming = loop.call_at(t0, self._event, loop, t0, 0, tail)
            return
        last = k == self.config.events - 1
        self.transport.write(_EVENT + tail if last else _EVENT)
        if last:
            self.streaming = None
            self._process()
            return
        # An absolute schedule, so pacing does not drift with the loop's own latency.
        self.streaming = loop.call_at(
            t0 + (k + 1) * self.config.gap, self._event, loop, t0, k + 1, tail
        )

    def _hold(self, loop: asyncio.AbstractEventLoop, until: float) -> None:
        assert self.transport is not None
        if self.closed:
            return
        if loop.time() >= until:
            self.transport.write(_FINISH + _USAGE + _DONE + _END)
            self.streaming = None
            self._process()
            return
        self.transport.write(_EVENT)
        self.streaming = loop.call_later(1.0, self._hold, loop, until)


async def serve(host: str, port: int, config: FakeConfig) -> None:
    """Serve until cancelled; print ``READY <port>`` once listening."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Protocol(config), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {bound}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gw_fake", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--events", type=int, default=32)
    parser.add_argument("--gap-ms", type=float, default=10.0)
    parser.add_argument("--first-delay-ms", type=float, default=0.0)
    parser.add_argument("--hold-s", type=float, default=120.0)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    args = parser.parse_args(argv)
    config = FakeConfig(
        events=args.events,
        gap_ms=args.gap_ms,
        first_delay_ms=args.first_delay_ms,
        hold_s=args.hold_s,
    )
    if args.loop == "uvloop":
        importlib.import_module("uvloop").run(serve(args.host, args.port, config))
    else:
        asyncio.run(serve(args.host, args.port, config))


if __name__ == "__main__":
    main()
