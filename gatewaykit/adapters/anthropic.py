"""Anthropic messages (``/v1/messages``) and token counting (``/v1/messages/count_tokens``).

Streaming usage comes in two parts: ``message_start`` carries the input and cache counts
(cache creation and cache reads are separate from ``input_tokens``, as in gatewaykit's
``Usage``), and each ``message_delta`` carries the cumulative output count. The adapter
forwards the client's ``anthropic-version`` and ``anthropic-beta`` headers and sends the
gateway's own ``x-api-key``.

Token counting is free at Anthropic: its route is unmetered (``ParsedRequest.metered``
False), so the gateway authenticates and rate-limits it but holds and charges nothing,
and the adapter reports zero usage.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from typing_extensions import Unpack

from gatewaykit.adapters.endpoint import (
    ProxyEndpoint,
    RawHeaders,
    base_headers,
    client_header,
    forwarded_body,
)
from gatewaykit.adapters.options import EndpointOptions, UnaryEndpointOptions
from gatewaykit.adapters.reading import EventKind, StreamUsage, text_len, tokens
from gatewaykit.adapters.sse import MalformedStreamError, SSEEvent
from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.http import UpstreamClient
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage, UsageSource

__all__ = [
    "DEFAULT_ANTHROPIC_VERSION",
    "MessagesStreamUsage",
    "anthropic_count_tokens",
    "anthropic_messages",
    "messages_usage",
]

#: Sent upstream when the client did not send ``anthropic-version``.
DEFAULT_ANTHROPIC_VERSION = "2023-06-01"


_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def messages_usage(usage: Any, source: UsageSource = UsageSource.PROVIDER) -> Usage | None:
    """gatewaykit ``Usage`` from an Anthropic ``usage`` object; None if absent or unreadable."""
    if not isinstance(usage, dict):
        return None
    counts = [tokens(usage.get(field)) for field in _FIELDS]
    if -1 in counts or (counts[0] is None and counts[1] is None):
        return None
    inp, out, cache_read, cache_write = (n or 0 for n in counts)
    return Usage(
        input_tokens=inp,
        output_tokens=out,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        source=source,
    )


def _block_chars(block: Any) -> int:
    if not isinstance(block, dict):
        return 0
    return (
        text_len(block.get("text"))
        + text_len(block.get("partial_json"))
        + text_len(block.get("thinking"))
    )


def _is_final_output(field: str, value: object) -> bool:
    return field == "output_tokens" and isinstance(value, int) and not isinstance(value, bool)


class MessagesStreamUsage(StreamUsage):
    """Usage of an Anthropic messages stream."""

    def __init__(self) -> None:
        super().__init__()
        self._fields: Mapping[str, Any] = {}  # the latest usage fields seen

    def observe(self, event: SSEEvent) -> EventKind:
        if event.data_bytes is None:
            return EventKind.FORWARD
        payload = event.json()
        if not isinstance(payload, dict):
            raise MalformedStreamError("an Anthropic stream event is not a JSON object")
        kind = payload.get("type", event.event)
        if kind == "content_block_delta":
            self.output_chars += _block_chars(payload.get("delta"))
        elif kind == "message_start":
            message = payload.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._fields = usage
                self.partial = messages_usage(usage, UsageSource.PARTIAL)
        elif kind == "message_delta":
            usage = payload.get("usage")
            if isinstance(usage, dict):
                # Output is cumulative and final here, even when it is 0; input/cache
                # counts override the start's only when given as non-zero (some servers
                # repeat them here as 0 or null).
                given = {k: v for k, v in usage.items() if v or _is_final_output(k, v)}
                merged = {**self._fields, **given}
                self._fields = merged
                final = messages_usage(merged)
                if final is not None:
                    self._report(final)
                self.partial = messages_usage(merged, UsageSource.PARTIAL)
        elif kind == "message_stop":
            return EventKind.FINAL
        elif kind == "error":
            error = payload.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            self.error = str(message or error or "error event")
            return EventKind.ERROR
        return EventKind.FORWARD


class _MessagesSpec:
    wire = WireFormat.ANTHROPIC_MESSAGES
    provider = "anthropic"

    def url(self, upstream: Upstream) -> str:
        return f"{upstream.base_url}/v1/messages"

    def headers(self, upstream: Upstream, client_headers: RawHeaders) -> dict[str, str]:
        headers = base_headers()
        version = client_header(client_headers, b"anthropic-version")
        headers["anthropic-version"] = version or DEFAULT_ANTHROPIC_VERSION
        beta = client_header(client_headers, b"anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
        if upstream.api_key:
            headers["x-api-key"] = upstream.api_key
        headers.update(upstream.headers)
        return headers

    def prepare(self, context: GatewayContext, attempt: Attempt) -> tuple[bytes, StreamUsage]:
        return forwarded_body(context, attempt), MessagesStreamUsage()

    def usage_from_body(self, body: dict[str, Any]) -> Usage | None:
        return messages_usage(body.get("usage"))

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        content = body.get("content")
        if not isinstance(content, list):
            return 0
        chars = 0
        for block in content:
            chars += _block_chars(block)
            if isinstance(block, dict) and isinstance(block.get("input"), dict):
                chars += len(str(block["input"]))
        return chars

    def response_id_from_body(self, body: dict[str, Any]) -> str | None:
        return None  # nothing a later request continues by id


class _CountTokensSpec(_MessagesSpec):
    wire = WireFormat.ANTHROPIC_COUNT_TOKENS

    def url(self, upstream: Upstream) -> str:
        return f"{upstream.base_url}/v1/messages/count_tokens"

    def usage_from_body(self, body: dict[str, Any]) -> Usage | None:
        return _FREE  # a count is not billed (its ``input_tokens`` is the answer, not usage)

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        return 0


_FREE = Usage()


def anthropic_messages(
    *,
    client: UpstreamClient | Any,
    **options: Unpack[EndpointOptions],
) -> ProxyEndpoint:
    """The ``/v1/messages`` endpoint: an ASGI app to mount behind GatewayMiddleware.

    Arguments as for :func:`gatewaykit.adapters.openai_chat_completions`.
    """
    return ProxyEndpoint(
        _MessagesSpec(),
        client=client,
        **options,
    )


def anthropic_count_tokens(
    *,
    client: UpstreamClient | Any,
    **options: Unpack[UnaryEndpointOptions],
) -> ProxyEndpoint:
    """The ``/v1/messages/count_tokens`` endpoint (unmetered: never held or charged)."""
    return ProxyEndpoint(_CountTokensSpec(), client=client, **options)
