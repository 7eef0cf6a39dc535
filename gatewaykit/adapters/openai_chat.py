"""OpenAI chat completions (``/v1/chat/completions``) and compatible servers.

Streaming usage arrives in one last chunk with ``usage`` and empty ``choices``, and only
when the request set ``stream_options.include_usage``. The adapter sets it when the client
did not ask for usage (keeping the client's other stream options) and then cuts that
chunk out of the client's stream, so the client sees exactly what it asked for. OpenAI
counts cached prompt tokens inside ``prompt_tokens``; gatewaykit's ``Usage`` keeps them
apart (``input_tokens = prompt_tokens - cached_tokens``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gatewaykit.adapters._proxy import (
    EventKind,
    PreparedBody,
    ProxyEndpoint,
    StreamUsage,
    UpstreamClient,
    base_headers,
    openai_usage,
    text_len,
)
from gatewaykit.adapters.sse import MalformedStreamError, SSEEvent
from gatewaykit.envelopes import WireFormat
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage

__all__ = [
    "ChatStreamUsage",
    "chat_usage",
    "openai_chat_completions",
]


def chat_usage(usage: Any) -> Usage | None:
    """gatewaykit ``Usage`` from an OpenAI chat ``usage`` object (None if there is none)."""
    return openai_usage(usage, "prompt_tokens", "completion_tokens")


_DELTA_TEXT = ("content", "refusal", "reasoning_content", "reasoning")


def _delta_chars(choices: Any) -> int:
    """Characters of generated text in a chunk's choices (or a message's, wrapped)."""
    if not isinstance(choices, list):
        return 0
    chars = 0
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        for key in _DELTA_TEXT:
            value = delta.get(key)
            if value.__class__ is str:
                chars += len(value)
        calls = delta.get("tool_calls")
        if calls and isinstance(calls, list):
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    chars += text_len(function.get("name")) + text_len(function.get("arguments"))
    return chars


class ChatStreamUsage(StreamUsage):
    """Usage of an OpenAI chat stream. ``hide_usage``: cut the usage chunk out."""

    def __init__(self, *, hide_usage: bool = False) -> None:
        super().__init__()
        self.hide_usage = hide_usage

    def observe(self, event: SSEEvent) -> EventKind:
        data = event.data_bytes
        if data is None:
            return EventKind.FORWARD  # a comment or keep-alive
        if data.strip() == b"[DONE]":
            return EventKind.FINAL
        chunk = event.json()
        if not isinstance(chunk, dict):
            raise MalformedStreamError("a chat completion chunk is not a JSON object")
        error = chunk.get("error")
        if error is not None and not chunk.get("choices"):
            message = error.get("message") if isinstance(error, dict) else None
            self.error = str(message or error)
            return EventKind.ERROR
        choices = chunk.get("choices")
        self.output_chars += _delta_chars(choices)
        usage = chat_usage(chunk.get("usage"))
        if usage is not None:
            self._final = usage
            if self.hide_usage and not choices:
                return EventKind.DROP
        return EventKind.FORWARD


class _ChatSpec:
    wire = WireFormat.OPENAI_CHAT
    provider = "openai"

    def __init__(self, *, inject_stream_usage: bool) -> None:
        self.inject_stream_usage = inject_stream_usage

    def url(self, upstream: Upstream) -> str:
        return f"{upstream.base_url}/chat/completions"

    def headers(self, upstream: Upstream, client_headers: Mapping[str, str]) -> dict[str, str]:
        headers = base_headers()
        if upstream.api_key:
            headers["authorization"] = f"Bearer {upstream.api_key}"
        headers.update(upstream.headers)
        return headers

    def prepare(self, body: Mapping[str, Any], attempt: Attempt, stream: bool) -> PreparedBody:
        prepared = dict(body)
        prepared["model"] = attempt.model
        hide = False
        if stream and self.inject_stream_usage:
            options = body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            if options.get("include_usage") is not True:
                # Usage is needed to bill; the client did not ask for it, so hide it.
                options["include_usage"] = True
                prepared["stream_options"] = options
                hide = True
        return PreparedBody(prepared, lambda: ChatStreamUsage(hide_usage=hide))

    def usage_from_body(self, body: Mapping[str, Any]) -> Usage | None:
        return chat_usage(body.get("usage"))

    def output_chars_from_body(self, body: Mapping[str, Any]) -> int:
        chars = 0
        for choice in body.get("choices") or ():
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict):
                chars += _delta_chars([{"delta": message}])
        return chars

    def response_id_from_body(self, body: Mapping[str, Any]) -> str | None:
        return None  # nothing a later request continues by id


def openai_chat_completions(
    *,
    client: UpstreamClient,
    connect_timeout: float | None = 10.0,
    read_timeout: float | None = 600.0,
    first_chunk_timeout: float | None = None,
    inject_stream_usage: bool = True,
) -> ProxyEndpoint:
    """The ``/v1/chat/completions`` endpoint: an ASGI app to mount behind GatewayMiddleware.

    ``client`` is the ``httpx.AsyncClient`` (or ``httpx2.AsyncClient``) used upstream;
    :func:`gatewaykit.adapters.default_client` builds a fast one. Timeouts are seconds
    (None: no limit); ``first_chunk_timeout`` bounds the wait for a stream's first event,
    after which the next attempt is tried. ``inject_stream_usage=False`` leaves
    ``stream_options`` alone for upstreams that reject it (streams are then billed by
    the missing-usage policy).
    """
    return ProxyEndpoint(
        _ChatSpec(inject_stream_usage=inject_stream_usage),
        client=client,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        first_chunk_timeout=first_chunk_timeout,
    )
