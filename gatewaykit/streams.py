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

__all__ = ["UsageExtractor", "settle_stream"]


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
    seen_chars = 0
    first = True
    try:
        async for chunk in chunks:
            extractor.feed(chunk)
            seen_chars = _observe(settlement, extractor, seen_chars)
            if first:
                first = False
                await settlement.on_first_chunk()
            yield chunk
    except Exception as exc:
        _observe(settlement, extractor, seen_chars)
        # Final usage the provider reported before failing is charged as reported; usage
        # from mid-stream is partial (topped up with the output observed since).
        await settlement.on_error(exc, extractor.result() or _as_partial(extractor.partial))
        raise
    usage = extractor.result()
    if usage is not None:
        await settlement.on_success(usage)
    else:
        await settlement.on_no_usage()


def _as_partial(usage: Usage | None) -> Usage | None:
    if usage is None or usage.source is not UsageSource.PROVIDER:
        return usage
    return dataclasses.replace(usage, source=UsageSource.PARTIAL)


def _observe(settlement: Settlement, extractor: UsageExtractor, seen_chars: int) -> int:
    if extractor.partial is not None and extractor.partial is not settlement.partial_usage:
        settlement.note_usage(extractor.partial)
    response_id = getattr(extractor, "response_id", None)
    if isinstance(response_id, str) and settlement.response_id is None:
        settlement.note_response(response_id)
    if extractor.output_chars > seen_chars:
        settlement.note_output(extractor.output_chars - seen_chars)
        return extractor.output_chars
    return seen_chars
