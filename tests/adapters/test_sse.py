"""The SSE splitter and the per-format usage extractors, without any I/O."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewaykit.adapters import ChatStreamUsage, MessagesStreamUsage, ResponsesStreamUsage
from gatewaykit.adapters.reading import EventKind
from gatewaykit.adapters.sse import MalformedStreamError, SSEEvent, SSESplitter
from gatewaykit.streams import UsageExtractor
from gatewaykit.usage import Usage, UsageSource

STREAM = (
    b"event: a\ndata: 1\n\n"
    b": comment\n\n"
    b"data: two\r\ndata: lines\r\n\r\n"
    b"event: c\rdata: 3\r\r"
    b'data: {"x": 4}\n\n'
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_splitter_finds_the_same_events_at_any_chunk_boundaries(cuts: list[int]) -> None:
    splitter = SSESplitter()
    events: list[SSEEvent] = []
    for chunk in split_at(STREAM, cuts):
        events.extend(splitter.feed(chunk))
    assert splitter.pending == b""
    assert b"".join(e.raw for e in events) == STREAM  # exact bytes, nothing re-encoded
    assert [(e.event, e.data) for e in events] == [
        ("a", "1"),
        (None, None),
        (None, "two\nlines"),
        ("c", "3"),
        (None, '{"x": 4}'),
    ]


def test_splitter_keeps_an_unfinished_event_pending() -> None:
    splitter = SSESplitter()
    events = splitter.feed(b"data: 1\n\ndata: 2")
    assert [e.raw for e in events] == [b"data: 1\n\n"]
    assert splitter.pending == b"data: 2"
    assert [e.data for e in splitter.feed(b"\n\n")] == ["2"]


def test_event_json_raises_a_clear_error() -> None:
    with pytest.raises(MalformedStreamError, match="not JSON"):
        SSEEvent(b"data: {oops\n\n").json()
    with pytest.raises(MalformedStreamError, match="no data"):
        SSEEvent(b"event: x\n\n").json()
    with pytest.raises(MalformedStreamError, match="not JSON"):
        SSEEvent(b'data: {"a": 1} trailing\n\n').json()
    with pytest.raises(MalformedStreamError, match="not JSON"):
        SSEEvent(b"data: \xff\n\n").json()
    assert SSEEvent(b'data:   {"a": 1}  \n\n').json() == {"a": 1}
    assert SSEEvent(b"data: [1,\ndata: 2]\n\n").json() == [1, 2]


def sse(payload: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(payload).encode() + b"\n\n"


def kinds(extractor: Any, stream: bytes) -> list[EventKind]:
    return [extractor.observe(e) for e in SSESplitter().feed(stream)]


def test_chat_usage_and_hidden_chunk() -> None:
    usage = {
        "prompt_tokens": 100,
        "completion_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 40},
    }
    stream = (
        sse({"choices": [{"delta": {"content": "hello"}}]})
        + sse(
            {
                "choices": [
                    {"delta": {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}}
                ]
            }
        )
        + sse({"choices": [], "usage": usage})
        + b"data: [DONE]\n\n"
    )
    hidden = ChatStreamUsage(hide_usage=True)
    assert kinds(hidden, stream) == [
        EventKind.FORWARD,
        EventKind.FORWARD,
        EventKind.DROP,
        EventKind.FINAL,
    ]
    assert hidden.result() == Usage(input_tokens=60, output_tokens=7, cache_read_tokens=40)
    assert hidden.output_chars == len("hello") + len("f{}")
    shown = ChatStreamUsage()
    assert kinds(shown, stream)[2] is EventKind.FORWARD


def test_chat_in_band_error() -> None:
    extractor = ChatStreamUsage()
    assert kinds(extractor, sse({"error": {"message": "boom"}})) == [EventKind.ERROR]
    assert extractor.error == "boom"


def test_messages_usage_is_partial_until_message_delta() -> None:
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 5,
                "cache_creation_input_tokens": 3,
                "output_tokens": 1,
            }
        },
    }
    extractor = MessagesStreamUsage()
    kinds(extractor, sse(start, "message_start"))
    assert extractor.result() is None
    assert extractor.partial == Usage(10, 1, 5, 3, UsageSource.PARTIAL)
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "abc"}}
    kinds(extractor, sse(delta, "content_block_delta"))
    assert extractor.output_chars == 3
    final = {"type": "message_delta", "usage": {"output_tokens": 9}}
    stop = {"type": "message_stop"}
    assert kinds(extractor, sse(final, "message_delta") + sse(stop, "message_stop")) == [
        EventKind.FORWARD,
        EventKind.FINAL,
    ]
    assert extractor.result() == Usage(10, 9, 5, 3)


def test_messages_delta_may_override_input_counts() -> None:
    extractor = MessagesStreamUsage()
    kinds(extractor, sse({"type": "message_start", "message": {"usage": {"input_tokens": 10}}}))
    kinds(
        extractor, sse({"type": "message_delta", "usage": {"input_tokens": 12, "output_tokens": 4}})
    )
    assert extractor.result() == Usage(12, 4)
    zeroed = {"type": "message_delta", "usage": {"input_tokens": 0, "output_tokens": 5}}
    kinds(extractor, sse(zeroed))
    assert extractor.result() == Usage(12, 5)


def test_messages_error_event() -> None:
    extractor = MessagesStreamUsage()
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    assert kinds(extractor, sse(error, "error")) == [EventKind.ERROR]
    assert extractor.error == "busy"


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        ("response.completed", EventKind.FINAL),
        ("response.incomplete", EventKind.FINAL),
        ("response.failed", EventKind.ERROR),
    ],
)
def test_responses_usage_from_each_terminal_event(event: str, kind: EventKind) -> None:
    usage = {"input_tokens": 50, "input_tokens_details": {"cached_tokens": 20}, "output_tokens": 8}
    extractor = ResponsesStreamUsage()
    delta = {"type": "response.output_text.delta", "delta": "hey"}
    stream = sse(delta, delta["type"]) + sse({"type": event, "response": {"usage": usage}}, event)
    assert kinds(extractor, stream) == [EventKind.FORWARD, kind]
    assert extractor.result() == Usage(input_tokens=30, output_tokens=8, cache_read_tokens=20)
    assert extractor.output_chars == 3


@pytest.mark.parametrize("cls", [ChatStreamUsage, MessagesStreamUsage, ResponsesStreamUsage])
def test_extractors_follow_the_usage_extractor_protocol(cls: type[Any]) -> None:
    extractor = cls()
    assert isinstance(extractor, UsageExtractor)
    extractor.feed(b"data: ")
    extractor.feed(b"[1, 2]")
    with pytest.raises(MalformedStreamError):
        extractor.feed(b"\n\n")


def test_chat_chunks_with_usage_null_are_scanned_and_the_usage_chunk_still_read() -> None:
    """OpenAI sends "usage": null in every chunk once usage is asked for."""
    chunk = {"choices": [{"index": 0, "delta": {"content": "hé\n"}}], "usage": None}
    usage = {"prompt_tokens": 9, "completion_tokens": 4}
    stream = sse(chunk) + sse(chunk) + sse({"choices": [], "usage": usage}) + b"data: [DONE]\n\n"
    extractor = ChatStreamUsage(hide_usage=True)
    assert kinds(extractor, stream) == [
        EventKind.FORWARD,
        EventKind.FORWARD,
        EventKind.DROP,
        EventKind.FINAL,
    ]
    assert extractor.output_chars == 2 * len("hé\n")
    assert extractor.result() == Usage(input_tokens=9, output_tokens=4)
