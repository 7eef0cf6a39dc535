"""Reading usage from provider answers: the per-format readers' shared parts.

Each wire format's module defines a :class:`StreamUsage` subclass (its stream reader) and
functions reading a non-streaming body. The rules they share live here:

* a token count is a non-negative ``int``; a usage object with a count of any other kind
  (negative, float, string) is *unreadable* and treated as missing usage — the
  missing-usage policy applies — never as zero tokens;
* a stream that reports usage twice is charged the larger of each field (a provider that
  repeats a smaller figure must not undercharge).
"""

from __future__ import annotations

import enum
from typing import Any

from gatewaykit.adapters.sse import SSEEvent, SSESplitter
from gatewaykit.usage import Usage, UsageSource

__all__ = [
    "EventKind",
    "StreamUsage",
    "larger",
    "openai_usage",
    "text_len",
    "tokens",
]


class EventKind(enum.Enum):
    """What the relay does with one upstream event."""

    FORWARD = "forward"  # pass it through
    DROP = "drop"  # cut it out (a usage chunk the client did not ask for)
    FINAL = "final"  # the stream's normal last event: held until settled
    ERROR = "error"  # the provider's own in-band error: held until settled


class StreamUsage:
    """Reads usage from one format's SSE stream; the ``UsageExtractor`` protocol.

    ``feed`` accepts arbitrary chunk boundaries (for :func:`gatewaykit.settle_stream`).
    The relay calls :meth:`observe` per complete event instead, to learn what to do with
    it. ``partial`` is usage reported before the end, ``output_chars`` the generated text
    seen so far, ``error`` the provider's in-band error message, if it sent one.
    ``response_id`` is the provider's id of the response, for formats whose responses can
    be continued later (OpenAI responses).
    """

    response_id: str | None = None

    def __init__(self) -> None:
        self.partial: Usage | None = None
        self.output_chars = 0
        self.error: str | None = None
        self._final: Usage | None = None
        self._splitter: SSESplitter | None = None

    def feed(self, chunk: bytes) -> None:
        if self._splitter is None:
            self._splitter = SSESplitter()
        for event in self._splitter.feed(chunk):
            self.observe(event)

    def result(self) -> Usage | None:
        """The provider's final usage, or None when the stream carried none (yet)."""
        return self._final

    def observe(self, event: SSEEvent) -> EventKind:  # pragma: no cover - abstract
        raise NotImplementedError

    def observe_data(self, data: bytes) -> EventKind:
        """:meth:`observe` for an event that is one ``data:`` line (the relay's fast path,
        with no :class:`SSEEvent` made); a reader that needs more may keep this default."""
        return self.observe(SSEEvent(b"data: " + data + b"\n\n"))

    def _report(self, usage: Usage) -> None:
        """A final usage object arrived; a repeated one keeps the larger of each field."""
        self._final = usage if self._final is None else larger(self._final, usage)


def tokens(value: object) -> int | None:
    """A token count: a non-negative int; None when absent; -1 when unreadable."""
    if value is None:
        return None
    if type(value) is int and value >= 0:
        return value
    return -1


def larger(a: Usage, b: Usage) -> Usage:
    """The larger of each count of two reports of the same call."""
    return Usage(
        input_tokens=max(a.input_tokens, b.input_tokens),
        output_tokens=max(a.output_tokens, b.output_tokens),
        cache_read_tokens=max(a.cache_read_tokens, b.cache_read_tokens),
        cache_write_tokens=max(a.cache_write_tokens, b.cache_write_tokens),
        source=b.source,
    )


def openai_usage(
    usage: Any, prompt_field: str, output_field: str, source: UsageSource = UsageSource.PROVIDER
) -> Usage | None:
    """``Usage`` from an OpenAI usage object; None when it is absent or unreadable.

    Chat names its counts ``prompt_tokens`` / ``completion_tokens``, responses
    ``input_tokens`` / ``output_tokens``; both report cached prompt tokens in
    ``<prompt_field>_details.cached_tokens``, as part of the prompt (gatewaykit's
    ``Usage`` keeps them apart).
    """
    if not isinstance(usage, dict):
        return None
    prompt = tokens(usage.get(prompt_field))
    output = tokens(usage.get(output_field))
    if prompt is None and output is None:
        return None
    details = usage.get(f"{prompt_field}_details")
    cached = tokens(details.get("cached_tokens")) if isinstance(details, dict) else None
    if prompt == -1 or output == -1 or cached == -1:
        return None
    prompt = prompt or 0
    cached = min(cached or 0, prompt)
    return Usage(
        input_tokens=prompt - cached,
        output_tokens=output or 0,
        cache_read_tokens=cached,
        source=source,
    )


def text_len(value: object) -> int:
    return len(value) if type(value) is str else 0
