"""The byte relay: one upstream response to the client, settled before its last bytes.

Streams are forwarded as they arrive, one ``send`` per upstream read, unchanged — except
that a read ending inside an event waits for the rest of that event, a chat usage chunk
the client did not ask for is cut out, and the final event (or the provider's in-band
error) is held back until the settlement is done. Only a *real* event (one with data)
commits the response: comments and keep-alives before it are held back with it, so a
provider that fails after a keep-alive can still be refunded and fallen back from.

A non-streaming answer is read whole (capped), settled, and only then sent: for a client
the body is the answer, so no byte of it leaves before its charge is durable
(docs/settlement.md). When the settlement cannot be recorded the client gets a 503 in
the format's envelope instead of the answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from gatewaykit.adapters.reading import EventKind, StreamUsage
from gatewaykit.adapters.sse import SSEEvent, SSESplitter
from gatewaykit.envelopes import WireFormat, error_body, stream_error_event
from gatewaykit.errors import (
    ErrorKind,
    MalformedStreamError,
    UpstreamConnectError,
    UpstreamError,
)
from gatewaykit.http import UpstreamResponse
from gatewaykit.settlement import Settlement, SettlementOutcome
from gatewaykit.streams import StreamMeter
from gatewaykit.usage import Usage

__all__ = ["BodyReader", "StreamCut", "relay_body", "relay_stream"]

logger = logging.getLogger("gatewaykit.adapters")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Said instead of the answer when its charge could not be recorded.
UNRECORDED = (
    "the gateway could not record this request's charge, so it withheld the answer; "
    "please retry shortly"
)


class BodyReader(Protocol):
    """Reads a format's non-streaming JSON answer."""

    def usage_from_body(self, body: dict[str, Any]) -> Usage | None: ...

    def output_chars_from_body(self, body: dict[str, Any]) -> int: ...

    def response_id_from_body(self, body: dict[str, Any]) -> str | None:
        """The id of a response a later request may continue (None for most formats)."""
        ...


class StreamCut:
    """Decides, per upstream read, what to forward now and what to hold (no I/O)."""

    __slots__ = ("held", "reader", "real", "splitter", "terminal")

    def __init__(self, reader: StreamUsage) -> None:
        self.reader = reader
        self.splitter = SSESplitter()
        self.held: list[bytes] | None = None  # the final event and everything after it
        self.terminal: EventKind | None = None
        self.real = False  # a data event has been forwarded: the response is committed

    def process(self, chunk: bytes) -> bytes:
        """The part of ``chunk`` to forward now; updates usage and the held tail."""
        reader = self.reader
        end = len(chunk) - 2
        if (
            self.held is None
            and chunk[:6] == b"data: "
            and chunk.find(b"\n") == end
            and chunk[end:] == b"\n\n"
            and chunk[end - 1] != 13  # not a CRLF line ending
            and not self.splitter.pending
        ):
            # The common read: exactly one event of one data line (OpenAI chat's chunks).
            kind = reader.observe_data(chunk[6:end])
            if kind is EventKind.FORWARD:
                self.real = True
                return chunk
            if kind is EventKind.DROP:
                return b""
            self.terminal = kind
            self.held = [chunk]
            return b""
        aligned = not self.splitter.pending  # does this read start at an event boundary?
        events = self.splitter.feed(chunk)
        if self.held is not None:
            for event in events:  # still read usage (e.g. response.failed after error)
                reader.observe(event)
            self.held.append(chunk)
            return b""
        whole = True
        out: list[bytes] = []
        for index, event in enumerate(events):
            kind = reader.observe(event)
            if kind is EventKind.FORWARD:
                if not self.real and event.data_bytes is not None:
                    self.real = True
                out.append(event.raw)
                continue
            whole = False
            if kind is EventKind.DROP:
                continue
            self.terminal = kind
            self.held = [e.raw for e in events[index:]]
            for later in events[index + 1 :]:
                reader.observe(later)
            self.held.append(self.splitter.pending)
            break
        if whole and aligned and not self.splitter.pending:
            return chunk  # the common case: forwarded as received, no copy
        return b"".join(out)

    def leftover(self) -> bytes:
        """At the end of the stream: a last event missing its blank line still counts."""
        leftover = self.splitter.pending
        if not leftover or self.held is not None:
            return b""
        self.splitter = SSESplitter()
        kind = self.reader.observe(SSEEvent(leftover))
        if kind is EventKind.FORWARD:
            return leftover
        if kind is not EventKind.DROP:
            self.terminal = kind
            self.held = [leftover]
        return b""

    @property
    def tail(self) -> bytes:
        return b"".join(self.held or ())


async def read_first(chunks: AsyncIterator[bytes], cut: StreamCut) -> bytes:
    """Read until the first real event (or a held final/error event); return what to send.

    Comments and keep-alives before it are returned with it, so nothing is reordered and
    nothing commits the response early. :class:`MalformedStreamError` when the stream
    ends first.
    """
    before: list[bytes] = []
    async for chunk in chunks:
        out = cut.process(chunk)
        if out:
            before.append(out)
        if cut.real or cut.held is not None:
            return b"".join(before)
    if cut.splitter.pending or before:
        raise MalformedStreamError("the upstream provider sent bytes that are not events")
    raise MalformedStreamError("the upstream provider sent an empty stream")


async def relay_stream(
    *,
    send: Send,
    wire: WireFormat,
    response: UpstreamResponse,
    chunks: AsyncIterator[bytes],
    first: bytes,
    cut: StreamCut,
    meter: StreamMeter,
) -> None:
    """Send the stream's head and ``first``, forward the rest, settle, then end it."""
    settlement = meter.settlement
    content_type = response.headers.get("content-type", "text/event-stream")
    await settlement.on_first_chunk()
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if first:
        await send({"type": "http.response.body", "body": first, "more_body": True})
    failure: Exception | None = None
    try:
        # The settlement's observations are synced from the reader only when they are
        # read (settling, or a disconnect: StreamMeter.consumed), not per event.
        async for chunk in chunks:
            out = cut.process(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
        out = cut.leftover()
        if out:
            await send({"type": "http.response.body", "body": out, "more_body": True})
    except (MalformedStreamError, UpstreamError) as exc:
        failure = exc
        logger.warning("upstream stream failed after it started: %s", exc)
    await response.aclose()
    tail = await _settle_stream(settlement, wire, cut, meter, failure)
    await send({"type": "http.response.body", "body": tail, "more_body": False})


async def _settle_stream(
    settlement: Settlement,
    wire: WireFormat,
    cut: StreamCut,
    meter: StreamMeter,
    failure: Exception | None,
) -> bytes:
    """Settle a stream that started; the bytes that end it for the client."""
    reader = cut.reader
    meter.sync()
    usage = reader.result()
    tail = cut.tail
    outcome: SettlementOutcome
    if cut.terminal is EventKind.FINAL or (failure is None and usage is not None):
        if failure is not None:
            logger.info("upstream failed after its final event: %s", failure)
        if usage is not None:
            outcome = await settlement.on_success(usage)
        else:
            outcome = await settlement.on_no_usage()
    elif cut.terminal is EventKind.ERROR:
        outcome = await settlement.on_error(
            f"upstream error: {reader.error or 'in-band error event'}", meter.consumed()
        )
    else:
        if failure is None:
            failure = MalformedStreamError("the stream ended before its final event")
        kind, message = describe(failure)
        outcome = await settlement.on_error(f"{message} ({failure})", meter.consumed())
        tail = stream_error_event(wire, kind, message)
    if not outcome.recorded:
        tail = stream_error_event(wire, ErrorKind.UNAVAILABLE, UNRECORDED)
    return tail


async def relay_body(
    *,
    send: Send,
    wire: WireFormat,
    response: UpstreamResponse,
    reader: BodyReader,
    settlement: Settlement,
    max_bytes: int,
) -> str | None:
    """Read a JSON answer, settle it, then send it whole; an error text if it is unusable.

    Returns None once a response went to the client; otherwise why the answer could not
    be used (nothing was sent: the caller may fall back).
    """
    status = response.status
    content_type = response.headers.get("content-type", "application/json")
    try:
        body = await response.read(max_bytes)
    except BaseException:
        await response.aclose()
        raise
    # Usage is read, and noted on the settlement, before the next await: a client that
    # leaves from here on is charged what the provider reported, not an estimate.
    problem, usage = _read_body(body, reader, settlement)
    await response.aclose()
    if problem is not None:
        return problem
    await settlement.on_first_chunk()
    if usage is not None:
        outcome = await settlement.on_success(usage)
    else:
        outcome = await settlement.on_no_usage()
    if not outcome.recorded:
        await send_error(send, wire, ErrorKind.UNAVAILABLE, UNRECORDED)
        return None
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return None


def _read_body(
    body: bytes, reader: BodyReader, settlement: Settlement
) -> tuple[str | None, Usage | None]:
    """(why the answer is unusable, or None; its usage) — noting usage and output."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    if not isinstance(payload, dict):
        return "the upstream provider sent a malformed JSON response", None
    try:
        usage = reader.usage_from_body(payload)
        chars = reader.output_chars_from_body(payload)
        response_id = reader.response_id_from_body(payload)
    except (TypeError, ValueError, AttributeError):
        return "the upstream provider sent malformed usage", None
    settlement.note_output(chars)
    if usage is not None:
        settlement.note_usage(usage)
    if response_id is not None:
        settlement.note_response(response_id)
    return None, usage


async def send_error(
    send: Send,
    wire: WireFormat,
    kind: ErrorKind,
    message: str,
    details: dict[str, object] | None = None,
) -> None:
    """A gateway-made error response in ``wire``'s envelope."""
    body = error_body(wire, kind, message, details)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": kind.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def describe(exc: BaseException) -> tuple[ErrorKind, str]:
    """The error kind and the client-facing message for a failed upstream exchange.

    Messages are gatewaykit's own (UpstreamError texts are, by construction), never an
    HTTP library's text, which may quote the gateway's credential.
    """
    if isinstance(exc, TimeoutError):
        return ErrorKind.UPSTREAM_TIMEOUT, "the upstream provider timed out"
    if isinstance(exc, MalformedStreamError):
        return (
            ErrorKind.UPSTREAM_UNREACHABLE,
            f"the upstream provider sent a malformed stream: {exc}",
        )
    if isinstance(exc, UpstreamConnectError):
        return ErrorKind.UPSTREAM_UNREACHABLE, "could not connect to the upstream provider"
    return ErrorKind.UPSTREAM_UNREACHABLE, "the connection to the upstream provider failed"
