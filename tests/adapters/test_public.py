"""The adapters' public surface is pinned."""

from __future__ import annotations

import importlib
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest

import gatewaykit.adapters

pytestmark = pytest.mark.anyio

EXPECTED = [
    "ChatStreamUsage",
    "MessagesStreamUsage",
    "ModelListing",
    "NotFoundEndpoint",
    "ProxyEndpoint",
    "ResponsesStreamUsage",
    "StreamUsage",
    "anthropic_count_tokens",
    "anthropic_messages",
    "default_client",
    "gateway_routes",
    "model_listing",
    "not_found_endpoint",
    "openai_chat_completions",
    "openai_embeddings",
    "openai_responses",
]


def test_adapters_all_is_pinned() -> None:
    assert sorted(gatewaykit.adapters.__all__) == EXPECTED


@pytest.mark.parametrize(
    "module",
    [
        "gatewaykit.adapters",
        "gatewaykit.adapters.anthropic",
        "gatewaykit.adapters.openai_chat",
        "gatewaykit.adapters.openai_responses",
        "gatewaykit.adapters.openai_embeddings",
        "gatewaykit.adapters.models",
        "gatewaykit.adapters.not_found",
        "gatewaykit.adapters.endpoint",
        "gatewaykit.adapters.reading",
        "gatewaykit.adapters.relay",
        "gatewaykit.adapters.sse",
        "gatewaykit.context",
        "gatewaykit.listing",
        "gatewaykit.http",
        "gatewaykit.testing.fake_provider",
    ],
)
def test_modules_declare_all(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names missing {name}"


def test_malformed_stream_error_is_in_the_one_exception_tree() -> None:
    from gatewaykit.adapters.sse import MalformedStreamError
    from gatewaykit.errors import GatewayKitError

    assert issubclass(MalformedStreamError, GatewayKitError)
    assert issubclass(MalformedStreamError, ValueError)


async def test_an_adapter_without_the_middleware_names_it() -> None:
    from gatewaykit.errors import SettlementMissingError

    endpoint = gatewaykit.adapters.openai_chat_completions(client=httpx.AsyncClient())

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        raise AssertionError("nothing may be sent")

    with pytest.raises(SettlementMissingError, match="GatewayMiddleware"):
        await endpoint({"type": "http", "headers": []}, receive, send)
