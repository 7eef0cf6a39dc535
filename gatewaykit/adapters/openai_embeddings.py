"""OpenAI embeddings (``/v1/embeddings``) and compatible servers.

Always one JSON answer, never a stream. The request is forwarded as sent (batches of
inputs, token arrays, ``dimensions`` and ``encoding_format`` included) and charged from the
answer's ``usage.prompt_tokens`` at the model's input price; an embedding has no output
tokens. An answer without usage is charged by the missing-usage policy (the estimate is
the input's size).
"""

from __future__ import annotations

from typing import Any

from typing_extensions import Unpack

from gatewaykit.adapters.endpoint import ProxyEndpoint, RawHeaders, forwarded_body
from gatewaykit.adapters.openai_chat import openai_headers
from gatewaykit.adapters.options import UnaryEndpointOptions
from gatewaykit.adapters.reading import StreamUsage, openai_usage
from gatewaykit.context import GatewayContext
from gatewaykit.envelopes import WireFormat
from gatewaykit.http import UpstreamClient
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage

__all__ = ["embeddings_usage", "openai_embeddings"]


def embeddings_usage(usage: Any) -> Usage | None:
    """gatewaykit ``Usage`` from an embeddings ``usage`` object (None if there is none)."""
    return openai_usage(usage, "prompt_tokens", "completion_tokens")


class _EmbeddingsSpec:
    wire = WireFormat.OPENAI_EMBEDDINGS
    provider = "openai"

    def url(self, upstream: Upstream) -> str:
        return f"{upstream.base_url}/embeddings"

    def headers(self, upstream: Upstream, client_headers: RawHeaders) -> dict[str, str]:
        return openai_headers(upstream)

    def prepare(self, context: GatewayContext, attempt: Attempt) -> tuple[bytes, StreamUsage]:
        return forwarded_body(context, attempt), StreamUsage()  # never read: no stream

    def usage_from_body(self, body: dict[str, Any]) -> Usage | None:
        return embeddings_usage(body.get("usage"))

    def output_chars_from_body(self, body: dict[str, Any]) -> int:
        return 0

    def response_id_from_body(self, body: dict[str, Any]) -> str | None:
        return None


def openai_embeddings(
    *,
    client: UpstreamClient | Any,
    **options: Unpack[UnaryEndpointOptions],
) -> ProxyEndpoint:
    """The ``/v1/embeddings`` endpoint: an ASGI app to mount behind GatewayMiddleware.

    ``options``: :class:`~gatewaykit.adapters.options.UnaryEndpointOptions`; a large
    batch's answer must fit in ``max_response_bytes``.
    """
    return ProxyEndpoint(_EmbeddingsSpec(), client=client, **options)
