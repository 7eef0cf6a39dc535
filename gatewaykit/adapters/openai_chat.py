"""OpenAI chat completions (``/v1/chat/completions``) and compatible servers.

Streaming usage arrives in one last chunk with ``usage`` and empty ``choices``, and only
when the request set ``stream_options.include_usage``. The adapter sets it when the client
did not ask for usage (keeping the client's other stream options) and then cuts that
chunk out of the client's stream, so the client sees exactly what it asked for. OpenAI
counts cached prompt tokens inside ``prompt_tokens``; gatewaykit's ``Usage`` keeps them
apart (``input_tokens = prompt_tokens - cached_tokens``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from typing_extensions import Unpack

from gatewaykit.adapters.endpoint import ProxyEndpoint, RawHeaders, base_headers, forwarded_body
from gatewaykit.adapters.options import EndpointOptions
from gatewaykit.adapters.reading import EventKind, StreamUsage, openai_usage, text_len
from gatewaykit.adapters.sse import MalformedStreamError, SSEEvent, parse_json
from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.http import UpstreamClient
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage

__all__ = [
    "ChatStreamUsage",
    "chat_usage",
    "openai_chat_completions",
    "openai_headers",
]


def chat_usage(usage: Any) -> Usage | None:
    """gatewaykit ``Usage`` from an OpenAI chat ``usage`` object (None if there is none)."""
    return openai_usage(usage, "prompt_tokens", "completion_tokens")


_OTHER_TEXT = ("refusal", "reasoning_content", "reasoning")


def _delta_chars(choices: Any, field: str = "delta") -> int:
    """Characters of generated text in a chunk's choices (``field="message"``: a body's)."""
    if type(choices) is not list:
        return 0
    chars = 0
    for choice in choices:
        delta = choice.get(field) if type(choice) is dict else None
        if type(delta) is not dict:
            continue
        rest = len(delta)
        if "content" in delta:
            chars += text_len(delta["content"])
            rest -= 1
        if rest > ("role" in delta):  # usually just role + content: skip the rarer fields
            for key in _OTHER_TEXT:
                chars += text_len(delta.get(key))
            calls = delta.get("tool_calls")
            if calls and type(calls) is list:
                for call in calls:
                    function = call.get("function") if type(call) is dict else None
                    if type(function) is dict:
                        chars += text_len(function.get("name"))
                        chars += text_len(function.get("arguments"))
    return chars


_TEXT = re.compile(
    rb'"(?:content|refusal|reasoning_content|reasoning|name|arguments)"\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)


_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')


def _no_usage(data: bytes) -> bool:
    """Whether a chunk carries no usage: no "usage" key, or only ``"usage": null`` (which
    OpenAI sends in every chunk of a stream that asked for usage)."""
    count = data.count(b'"usage"')
    if count == 1 and b'"usage":null' in data:  # OpenAI's compact form: no regex
        return True
    return not count or count == len(_NULL_USAGE.findall(data))


def _text_chars(data: bytes) -> int:
    """Characters of generated text in a chunk's raw JSON, exactly (escapes decoded)."""
    chars = 0
    for raw in _TEXT.findall(data):
        if b"\\" in raw:
            try:
                chars += len(json.loads(b'"' + raw + b'"'))
            except ValueError:
                chars += len(raw)
        else:
            chars += len(raw.decode("utf-8", "replace"))
    return chars


class ChatStreamUsage(StreamUsage):
    """Usage of an OpenAI chat stream. ``hide_usage``: cut the usage chunk out."""

    def __init__(self, *, hide_usage: bool = False) -> None:
        super().__init__()
        self.hide_usage = hide_usage
        self._checked = False  # the first event was parsed as a JSON object

    def observe(self, event: SSEEvent) -> EventKind:
        data = event.data_bytes
        if data is None:
            return EventKind.FORWARD  # a comment or keep-alive
        return self.observe_data(data)

    def observe_data(self, data: bytes) -> EventKind:
        if data[:1] != b"{" and data.strip() == b"[DONE]":
            return EventKind.FINAL
        if self._checked and b'"error"' not in data and _no_usage(data):
            # A content chunk after the first (nearly every event): only its text is
            # wanted, found by a byte scan instead of a full JSON parse. Inside a JSON
            # string a quote is always escaped, so '"content": "' can only be a key.
            # The first event is parsed whole: a malformed stream is caught while the
            # request can still be refunded and fall back; later ones reach the client
            # as sent, and a usage chunk is always parsed.
            self.output_chars += _text_chars(data)
            return EventKind.FORWARD
        chunk = parse_json(data)
        self._checked = True
        if type(chunk) is not dict:
            raise MalformedStreamError("a chat completion chunk is not a JSON object")
        choices = chunk.get("choices")
        if choices:
            self.output_chars += _delta_chars(choices)
        elif "error" in chunk and chunk["error"] is not None:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            self.error = str(message or error)
            return EventKind.ERROR
        if chunk.get("usage") is not None:
            usage = chat_usage(chunk["usage"])
            if usage is not None:
                self._report(usage)
            if self.hide_usage and not choices:
                return EventKind.DROP
        return EventKind.FORWARD


def openai_headers(upstream: Upstream) -> dict[str, str]:
    """The upstream headers of every OpenAI API: a bearer credential, then the upstream's."""
    headers = base_headers()
    if upstream.api_key:
        headers["authorization"] = f"Bearer {upstream.api_key}"
    headers.update(upstream.headers)
    return headers


class _ChatSpec:
    wire = WireFormat.OPENAI_CHAT
    provider = "openai"

    def __init__(self, *, inject_stream_usage: bool) -> None:
        self.inject_stream_usage = inject_stream_usage

    def url(self, upstream: Upstream) -> str:
        return f"{upstream.base_url}/chat/completions"

    def headers(self, upstream: Upstream, client_headers: RawHeaders) -> dict[str, str]:
        return openai_headers(upstream)

    def prepare(self, context: GatewayContext, attempt: Attempt) -> tuple[bytes, StreamUsage]:
        if context.stream and self.inject_stream_usage:
            options = context.body.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            if options.get("include_usage") is not True:
                # Usage is needed to bill; the client did not ask for it, so hide it.
                options["include_usage"] = True
                body = forwarded_body(context, attempt, {"stream_options": options})
                return body, ChatStreamUsage(hide_usage=True)
        return forwarded_body(context, attempt), ChatStreamUsage()

    def usage_from_body(self, body: dict[str, Any]) -> Usage | None:
        return chat_usage(body.get("usage"))

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        return _delta_chars(body.get("choices"), "message")

    def response_id_from_body(self, body: dict[str, Any]) -> str | None:
        return None  # nothing a later request continues by id


def openai_chat_completions(
    *,
    client: UpstreamClient | Any,
    inject_stream_usage: bool = True,
    **options: Unpack[EndpointOptions],
) -> ProxyEndpoint:
    """The ``/v1/chat/completions`` endpoint: an ASGI app to mount behind GatewayMiddleware.

    ``client`` is the upstream client: :func:`gatewaykit.adapters.default_client` (aiohttp,
    the fast one), or an ``httpx.AsyncClient`` / ``httpx2.AsyncClient``. ``options`` are
    the timeouts and the body cap of :class:`~gatewaykit.adapters.options.EndpointOptions`
    (``connect_timeout``, ``read_timeout``, ``first_chunk_timeout``,
    ``max_response_bytes``). ``inject_stream_usage=False``
    leaves ``stream_options`` alone for upstreams that reject it (streams are then billed
    by the missing-usage policy).
    """
    return ProxyEndpoint(
        _ChatSpec(inject_stream_usage=inject_stream_usage),
        client=client,
        **options,
    )
