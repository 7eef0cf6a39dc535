"""An incremental server-sent-events splitter that never re-chunks what it forwards.

The adapters forward upstream bytes as they arrive. To read usage on the side, hide the
chat usage chunk the client did not ask for, and hold back the stream's final event until
the settlement is done, they must know where each event ends. :class:`SSESplitter` finds
event boundaries (a blank line: ``\\n\\n``, ``\\r\\n\\r\\n`` or ``\\r\\r``) in each chunk and
hands back complete events whose ``raw`` bytes are exactly what the upstream sent.
Nothing is decoded or re-encoded; an event split across reads is returned once complete.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gatewaykit.errors import MalformedStreamError

__all__ = ["MAX_EVENT_BYTES", "MalformedStreamError", "SSEEvent", "SSESplitter", "parse_json"]

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\r|\n")
_raw_decode = json.JSONDecoder().raw_decode


class SSEEvent:
    """One complete event: its exact bytes, and its ``event`` and ``data`` fields.

    Fields are parsed on first access; ``data_bytes`` and :meth:`json` avoid decoding.
    """

    __slots__ = ("_data", "_name", "_parsed", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._parsed = False
        self._name: str | None = None
        self._data: bytes | None = None

    def __repr__(self) -> str:
        return f"SSEEvent({self.raw!r})"

    def _parse(self) -> None:
        raw = self.raw
        end = len(raw) - 2
        if (
            raw[:6] == b"data: "
            and raw.find(b"\n") == end
            and raw[end:] == b"\n\n"
            and raw[end - 1] != 13
        ):
            # The usual event, one "data: ..." line: no line splitting needed.
            self._data = raw[6:-2]
            self._parsed = True
            return
        lines = raw.split(b"\n") if b"\r" not in raw else _LINE.split(raw)
        name: str | None = None
        data: list[bytes] = []
        for line in lines:
            if not line or line[0] == 58:  # b":" starts a comment
                continue
            field, sep, value = line.partition(b":")
            if sep and value[:1] == b" ":
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value.decode("utf-8", "replace")
        self._name = name
        if data:
            self._data = data[0] if len(data) == 1 else b"\n".join(data)
        self._parsed = True

    @property
    def event(self) -> str | None:
        """The ``event:`` field, or None (SSE's default type ``message``)."""
        if not self._parsed:
            self._parse()
        return self._name

    @property
    def data_bytes(self) -> bytes | None:
        """The ``data:`` lines joined with newlines, undecoded; None when there are none."""
        if not self._parsed:
            self._parse()
        return self._data

    @property
    def data(self) -> str | None:
        """The ``data:`` lines joined with newlines, or None when the event has none."""
        data = self.data_bytes
        return None if data is None else data.decode("utf-8", "replace")

    def json(self) -> Any:
        """The ``data`` field parsed as JSON; :class:`MalformedStreamError` if it is not."""
        data = self.data_bytes
        if data is None:
            raise MalformedStreamError(f"event {self.event or 'message'!r} has no data")
        return parse_json(data, self.event)


def parse_json(data: bytes, event: str | None = None) -> Any:
    """An event's data as JSON; :class:`MalformedStreamError` if it is not.

    json.loads minus its per-call wrapping (encoding detection, argument handling): this
    runs once per streamed event.
    """
    try:
        text = data.decode("utf-8")
        if text[:1].isspace():
            text = text.lstrip()
        value, end = _raw_decode(text)
        if end != len(text) and not text[end:].isspace():
            raise ValueError("trailing data")
    except (ValueError, RecursionError):  # includes UnicodeDecodeError and JSONDecodeError
        raise MalformedStreamError(
            f"event {event or 'message'!r} carries data that is not JSON"
        ) from None
    return value


#: The largest event the splitter waits for; an upstream that sends more without a blank
#: line is not speaking SSE, and the gateway will not buffer it without bound.
MAX_EVENT_BYTES = 8 * 1024 * 1024


class SSESplitter:
    """Split a byte stream into complete SSE events, incrementally.

    ``feed(chunk)`` returns the events completed by ``chunk``; bytes of an unfinished
    event stay in :attr:`pending` until a later chunk completes them (at most
    ``max_event_bytes``: beyond, :class:`MalformedStreamError`).
    """

    __slots__ = ("_buffer", "_limit")

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._limit = max_event_bytes

    @property
    def pending(self) -> bytes:
        """Bytes received that do not yet end an event."""
        return self._buffer

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if self._buffer:
            # Re-scan a little of the old tail: a boundary may straddle the two reads.
            start = max(0, len(self._buffer) - 3)
            buffer = self._buffer + chunk
        else:
            start = 0
            buffer = chunk
        events: list[SSEEvent] = []
        begin = 0
        if b"\r" not in buffer:  # the common case: LF line endings, plain find
            while True:
                found = buffer.find(b"\n\n", start)
                if found < 0:
                    break
                end = found + 2
                events.append(SSEEvent(buffer[begin:end]))
                begin = start = end
        else:
            while True:
                match = _BOUNDARY.search(buffer, start)
                if match is None:
                    break
                end = match.end()
                events.append(SSEEvent(buffer[begin:end]))
                begin = start = end
        self._buffer = buffer[begin:] if begin < len(buffer) else b""
        if len(self._buffer) > self._limit:
            raise MalformedStreamError(
                f"an event passed {self._limit} bytes without ending (not server-sent events?)"
            )
        return events
