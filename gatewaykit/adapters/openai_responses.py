"""OpenAI responses (``/v1/responses``).

Streaming usage arrives in the terminal event — ``response.completed``,
``response.incomplete`` or ``response.failed`` — under ``response.usage``; there is no
``[DONE]``. ``input_tokens`` includes ``input_tokens_details.cached_tokens``; gatewaykit's
``Usage`` keeps them apart.

The response's id (``id`` of a JSON body; ``response.id`` of the ``response.created`` and
terminal events of a stream) is noted on the settlement (``note_response``), so the
context a later request continuing it is billed for can be remembered
(:mod:`gatewaykit.stored_context`).
"""

from __future__ import annotations

from typing import Any

from typing_extensions import Unpack

from gatewaykit.adapters.endpoint import ProxyEndpoint, RawHeaders, forwarded_body
from gatewaykit.adapters.openai_chat import openai_headers
from gatewaykit.adapters.options import EndpointOptions
from gatewaykit.adapters.reading import EventKind, StreamUsage, openai_usage, text_len
from gatewaykit.adapters.sse import MalformedStreamError, SSEEvent
from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.http import UpstreamClient
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage

__all__ = [
    "ResponsesStreamUsage",
    "openai_responses",
    "response_id",
    "responses_usage",
]

_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_CREATED = frozenset({"response.created", "response.in_progress"})
_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)


def responses_usage(usage: Any) -> Usage | None:
    """gatewaykit ``Usage`` from a responses ``usage`` object (None if there is none)."""
    return openai_usage(usage, "input_tokens", "output_tokens")


def response_id(response: Any) -> str | None:
    """The ``id`` of a responses ``response`` object (None if it has none)."""
    if not isinstance(response, dict):
        return None
    value = response.get("id")
    return value if isinstance(value, str) and value else None


class ResponsesStreamUsage(StreamUsage):
    """Usage of an OpenAI responses stream."""

    def observe(self, event: SSEEvent) -> EventKind:
        if event.data_bytes is None:
            return EventKind.FORWARD
        payload = event.json()
        if not isinstance(payload, dict):
            raise MalformedStreamError("a responses stream event is not a JSON object")
        kind = payload.get("type", event.event)
        if kind in _TEXT_DELTAS:
            self.output_chars += text_len(payload.get("delta"))
        elif kind in _CREATED:
            if self.response_id is None:
                self.response_id = response_id(payload.get("response"))
        elif kind in _TERMINAL:
            response = payload.get("response")
            if self.response_id is None:
                self.response_id = response_id(response)
            usage = responses_usage(response.get("usage")) if isinstance(response, dict) else None
            if usage is not None:
                self._report(usage)
            if kind == "response.failed":
                error = response.get("error") if isinstance(response, dict) else None
                message = error.get("message") if isinstance(error, dict) else None
                self.error = str(message or "response.failed")
                return EventKind.ERROR
            return EventKind.FINAL
        elif kind == "error":
            self.error = str(payload.get("message") or "error event")
            return EventKind.ERROR
        return EventKind.FORWARD


class _ResponsesSpec:
    wire = WireFormat.OPENAI_RESPONSES
    provider = "openai"

    def url(self, upstream: Upstream) -> str:
        return f"{upstream.base_url}/responses"

    def headers(self, upstream: Upstream, client_headers: RawHeaders) -> dict[str, str]:
        return openai_headers(upstream)

    def prepare(self, context: GatewayContext, attempt: Attempt) -> tuple[bytes, StreamUsage]:
        return forwarded_body(context, attempt), ResponsesStreamUsage()

    def usage_from_body(self, body: dict[str, Any]) -> Usage | None:
        return responses_usage(body.get("usage"))

    def response_id_from_body(self, body: dict[str, Any]) -> str | None:
        return response_id(body)

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        chars = 0
        for item in body.get("output") or ():
            if not isinstance(item, dict):
                continue
            chars += text_len(item.get("arguments"))
            for part in item.get("content") or ():
                if isinstance(part, dict):
                    chars += text_len(part.get("text")) + text_len(part.get("refusal"))
        return chars


def openai_responses(
    *,
    client: UpstreamClient | Any,
    **options: Unpack[EndpointOptions],
) -> ProxyEndpoint:
    """The ``/v1/responses`` endpoint: an ASGI app to mount behind GatewayMiddleware.

    Arguments as for :func:`gatewaykit.adapters.openai_chat_completions`.
    """
    return ProxyEndpoint(
        _ResponsesSpec(),
        client=client,
        **options,
    )
