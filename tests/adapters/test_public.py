"""The adapters' public surface is pinned."""

from __future__ import annotations

import importlib

import pytest

import gatewaykit.adapters

EXPECTED = [
    "ChatStreamUsage",
    "EventKind",
    "MalformedStreamError",
    "MessagesStreamUsage",
    "ProxyEndpoint",
    "ResponsesStreamUsage",
    "SSEEvent",
    "SSESplitter",
    "StreamUsage",
    "UpstreamClient",
    "anthropic_messages",
    "default_client",
    "gateway_routes",
    "openai_chat_completions",
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
        "gatewaykit.adapters.sse",
        "gatewaykit.http",
        "gatewaykit.testing.fake_provider",
    ],
)
def test_modules_declare_all(module: str) -> None:
    mod = importlib.import_module(module)
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.__all__ names missing {name}"


def test_malformed_stream_error_is_in_the_one_exception_tree() -> None:
    from gatewaykit.errors import GatewayKitError

    assert issubclass(gatewaykit.adapters.MalformedStreamError, GatewayKitError)
    assert issubclass(gatewaykit.adapters.MalformedStreamError, ValueError)
