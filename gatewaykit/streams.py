"""Settling any byte stream: ``settle_stream`` and the ``UsageExtractor`` protocol.

For custom handlers that stream a provider's response themselves::

    settlement = get_settlement(request)
    chunks = settle_stream(upstream.aiter_raw(), settlement, MyExtractor())
    return StreamingResponse(chunks, media_type="text/event-stream")

The wrapper feeds every chunk to the extractor, keeps the settlement's observations
(partial usage, output characters) current after each chunk, marks the settlement
committed before the first chunk goes out, and settles when the stream ends or fails.
It deliberately does nothing in a ``finally``: an abandoned iterator (client gone) is
settled by GatewayMiddleware as incomplete, with the observations made so far.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, AsyncIterator
from typing import Protocol, runtime_checkable

from gatewaykit.settlement import Settlement
from gatewaykit.usage import Usage, UsageSource

__all__ = ["StreamMeter", "UsageExtractor", "settle_stream"]


@runtime_checkable
class UsageExtractor(Protocol):
    """Reads usage from a provider's stream on the side, one raw chunk at a time.

    ``feed`` must accept arbitrary chunk boundaries (an SSE event may span chunks).
    ``partial`` is usage the provider reported before the end (e.g. Anthropic's
    ``message_start``), ``output_chars`` the generated text seen so far; both are used to
    charge a stream that never finishes. ``result`` is the final provider usage, or None
    when the stream carried none. An extractor may also have a ``response_id`` attribute
    (the responses extractor does): ``settle_stream`` notes it on the settlement, so a
    later request continuing that response is held for its stored context.
    """

    partial: Usage | None
    output_chars: int

    def feed(self, chunk: bytes) -> None: ...

    def result(self) -> Usage | None: ...


async def settle_stream(
    chunks: AsyncIterable[bytes], settlement: Settlement, extractor: UsageExtractor
) -> AsyncIterator[bytes]:
    """Yield ``chunks`` unchanged and call the settlement's hooks for them.

    First chunk → ``on_first_chunk`` (before it is yielded); normal end →
    ``on_success(usage)`` or ``on_no_usage()``; an exception → ``on_error`` (then
    re-raised). Settlement happens before the consumer sees the end of the iterator, so
    a ``StreamingResponse`` settles before it sends its final message.
    """
    settlement.note_upstream_contacted()
    meter = StreamMeter(settlement, extractor)
    first = True
    try:
        async for chunk in chunks:
            extractor.feed(chunk)
            meter.sync()
            if first:
                first = False
                await settlement.on_first_chunk()
            yield chunk
    except Exception as exc:
        await settlement.on_error(exc, meter.consumed())
        raise
    usage = extractor.result()
    if usage is not None:
        await settlement.on_success(usage)
    else:
        await settlement.on_no_usage()


class StreamMeter:
    """Keeps a settlement's observations current from a stream's usage reader.

    Shared by :func:`settle_stream` and the adapters' relay: after each chunk,
    :meth:`sync` hands the settlement the output seen since and any partial usage, which
    is what a stream that never finishes is charged on.
    """

    __slots__ = ("_chars", "reader", "settlement")

    def __init__(self, settlement: Settlement, reader: UsageExtractor) -> None:
        self.settlement = settlement
        self.reader = reader
        self._chars = 0

    def sync(self) -> None:
        reader, settlement = self.reader, self.settlement
        chars = reader.output_chars
        if chars > self._chars:
            settlement.note_output(chars - self._chars)
            self._chars = chars
        partial = reader.partial
        if partial is not None and partial is not settlement.partial_usage:
            settlement.note_usage(partial)
        if settlement.response_id is None:
            response_id = getattr(reader, "response_id", None)
            if isinstance(response_id, str):
                settlement.note_response(response_id)

    def consumed(self) -> Usage | None:
        """What a stream that ended early used: its final usage if the provider reported it
        (charged as reported), else the partial usage (topped up with observed output)."""
        self.sync()
        final = self.reader.result()
        if final is not None:
            return final
        partial = self.reader.partial
        if partial is None or partial.source is not UsageSource.PROVIDER:
            return partial
        return dataclasses.replace(partial, source=UsageSource.PARTIAL)
