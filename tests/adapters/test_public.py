"""The adapters' public surface is pinned."""

from __future__ import annotations

import importlib
import types
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest

import gatewaykit.adapters

pytestmark = pytest.mark.anyio

EXPECTED = [
    "ChatStreamUsage",
    "MessagesStreamUsage",
    "ResponsesStreamUsage",
    "anthropic_count_tokens",
    "anthropic_messages",
    "default_client",
    "gateway_routes",
    "model_listing",
    "not_found_endpoint",
    "openai_chat_completions",
    "openai_embeddings",
    "openai_responses",
    "openapi_paths",
]


def test_adapters_all_is_pinned() -> None:
    assert sorted(gatewaykit.adapters.__all__) == EXPECTED


def test_exported_members() -> None:
    """As httpx's test: every public name the package binds is exported (or a submodule),
    so an import added to ``__init__`` cannot widen the surface unnoticed."""
    bound = {
        name
        for name, value in vars(gatewaykit.adapters).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert sorted(bound) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_every_exported_name_is_documented(name: str) -> None:
    assert getattr(gatewaykit.adapters, name).__doc__


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
        "gatewaykit.adapters.routes",
        "gatewaykit.adapters.options",
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


def test_openapi_paths_describe_the_gateway_routes_under_a_prefix() -> None:
    paths = gatewaykit.adapters.openapi_paths("/llm/v1/")
    assert sorted(paths) == [
        "/llm/v1/chat/completions",
        "/llm/v1/embeddings",
        "/llm/v1/messages",
        "/llm/v1/messages/count_tokens",
        "/llm/v1/models",
        "/llm/v1/models/{model_id}",
        "/llm/v1/responses",
    ]
    messages = paths["/llm/v1/messages"]["post"]["responses"]["402"]
    schema = messages["content"]["application/json"]["schema"]
    assert schema["properties"]["type"] == {"const": "error"}  # Anthropic's envelope
    chat = paths["/llm/v1/chat/completions"]["post"]["responses"]
    assert "text/event-stream" in chat["200"]["content"]
