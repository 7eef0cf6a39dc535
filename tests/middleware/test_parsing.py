"""Reading model, stream flag, prompt size, output cap and user from each wire format."""

from __future__ import annotations

from typing import Any

import pytest

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import RequestRejected
from gatewaykit.parsing import ATTACHMENT_CHARS, ParsedRequest, parse_body, parse_request

CHAT = WireFormat.OPENAI_CHAT
MESSAGES = WireFormat.ANTHROPIC_MESSAGES
RESPONSES = WireFormat.OPENAI_RESPONSES


@pytest.mark.parametrize(
    ("fmt", "body", "expected"),
    [
        (
            CHAT,
            {
                "model": "m",
                "stream": True,
                "max_tokens": 5,
                "max_completion_tokens": 7,
                "user": "u",
                "messages": [
                    {"role": "system", "content": "abc"},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "defg"},
                            {"type": "image_url", "image_url": {"url": "data:" + "A" * 10_000}},
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                    },
                ],
            },
            ParsedRequest("m", True, 3 + 4 + ATTACHMENT_CHARS + 29, 7, "u"),
        ),
        (CHAT, {"model": "m", "messages": [], "max_tokens": 5}, ParsedRequest("m", False, 0, 5)),
        (  # both caps: the larger is held, whichever the upstream honours
            CHAT,
            {"model": "m", "messages": [], "max_tokens": 9, "max_completion_tokens": 4},
            ParsedRequest("m", False, 0, 9),
        ),
        (
            MESSAGES,
            {
                "model": "c",
                "max_tokens": 9,
                "system": [{"type": "text", "text": "sys"}],
                "metadata": {"user_id": "bob"},
                "messages": [
                    {"role": "user", "content": "hello"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "name": "t", "input": {"a": 1}}],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "content": [{"type": "text", "text": "ok"}]}
                        ],
                    },
                ],
            },
            ParsedRequest("c", False, 3 + 5 + (7 + 1) + 2, 9, "bob"),
        ),
        (
            RESPONSES,
            {
                "model": "r",
                "instructions": "be brief",
                "max_output_tokens": 3,
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "hi there"}]},
                    {"type": "function_call", "arguments": '{"x":1}'},
                    {"type": "function_call_output", "output": "42"},
                ],
            },
            ParsedRequest("r", False, 8 + 8 + 7 + 2, 3),
        ),
        (RESPONSES, {"model": "r", "input": "just text"}, ParsedRequest("r", False, 9, None)),
    ],
)
def test_parse_request(fmt: WireFormat, body: dict[str, Any], expected: ParsedRequest) -> None:
    assert parse_request(fmt, body) == expected


def test_tools_count_toward_the_prompt() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    without = parse_request(CHAT, {"model": "m", "messages": []})
    with_tools = parse_request(CHAT, {"model": "m", "messages": [], "tools": tools})
    assert with_tools.prompt_chars > without.prompt_chars


@pytest.mark.parametrize(
    ("fmt", "body"),
    [
        (CHAT, {"messages": []}),
        (CHAT, {"model": " ", "messages": []}),
        (CHAT, {"model": "m", "messages": [1]}),
        (CHAT, {"model": "m", "messages": [], "max_completion_tokens": 1.5}),
        (CHAT, {"model": "m", "messages": [], "max_tokens": True}),
        (MESSAGES, {"model": "m", "messages": [], "metadata": "x"}),
        (MESSAGES, {"model": "m", "messages": {}}),
        (MESSAGES, {"model": "m", "messages": ["x"]}),
        (RESPONSES, {"model": "m", "input": 3}),
    ],
)
def test_unusable_requests_are_rejected(fmt: WireFormat, body: dict[str, Any]) -> None:
    with pytest.raises(RequestRejected) as rejected:
        parse_request(fmt, body)
    assert rejected.value.status == 400


def thinking(budget: object, max_tokens: int = 4096) -> dict[str, Any]:
    enabled = {"type": "enabled", "budget_tokens": budget}
    return {"model": "c", "max_tokens": max_tokens, "messages": [], "thinking": enabled}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (thinking(1023), "thinking.enabled.budget_tokens: Input should be greater than or"),
        (thinking(0), "greater than or equal to 1024"),
        (thinking("2048"), "thinking.enabled.budget_tokens: Input should be a valid integer"),
        (thinking(None), "thinking.enabled.budget_tokens: Field required"),
        ({**thinking(2048), "thinking": "on"}, "'thinking' must be an object"),
    ],
)
def test_an_invalid_anthropic_thinking_budget_is_refused(
    body: dict[str, Any], message: str
) -> None:
    """Anthropic refuses these with 400 anyway: refusing first saves a hold and a call."""
    with pytest.raises(RequestRejected) as rejected:
        parse_request(MESSAGES, body)
    assert rejected.value.status == 400
    assert message in str(rejected.value)


@pytest.mark.parametrize(
    "body",
    [
        thinking(1024),
        # Interleaved thinking (a beta) lets the budget exceed max_tokens: passed through.
        thinking(32_000, max_tokens=16_000),
        {**thinking(5), "thinking": {"type": "disabled"}},
        {**thinking(5), "thinking": {"type": "adaptive"}},
    ],
)
def test_valid_or_unknown_thinking_passes_held_at_max_tokens(body: dict[str, Any]) -> None:
    assert parse_request(MESSAGES, body).max_output_tokens == body["max_tokens"]


def test_parse_body() -> None:
    assert parse_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"", b"null", b"[]", b"\x80"):
        with pytest.raises(RequestRejected):
            parse_body(raw)


EMBEDDINGS = WireFormat.OPENAI_EMBEDDINGS
COUNT_TOKENS = WireFormat.ANTHROPIC_COUNT_TOKENS


@pytest.mark.parametrize(
    ("given", "chars"),
    [
        ("abcdefg", 7),
        (["abc", "de"], 5),
        ([11, 12, 13], 12),  # one token array: 4 characters a token, so estimated exactly
        ([[1, 2], [3]], 12),
        (["abc", [1, 2]], 11),  # mixed, as some compatible servers accept
    ],
)
def test_embeddings_input_is_measured_in_every_shape(given: Any, chars: int) -> None:
    parsed = parse_request(EMBEDDINGS, {"model": "e", "input": given, "user": "u"})
    assert parsed == ParsedRequest(model="e", prompt_chars=chars, max_output_tokens=0, user="u")


@pytest.mark.parametrize("given", [None, "", [], [[]], [None], [1.5], [[1, "a"]], {"a": 1}, 7])
def test_unusable_embeddings_input_is_rejected(given: Any) -> None:
    body = {"model": "e", "input": given}
    if given == "":
        assert parse_request(EMBEDDINGS, body).prompt_chars == 0  # the provider decides
        return
    with pytest.raises(RequestRejected, match="'input' must be"):
        parse_request(EMBEDDINGS, body)


def test_count_tokens_is_unmetered_and_holds_nothing() -> None:
    from decimal import Decimal

    from gatewaykit.modes.admission import estimate
    from gatewaykit.modes.base import GatewayRequest
    from gatewaykit.pricing import ModelPrice

    body = {"model": "c", "system": "ab", "messages": [{"role": "user", "content": "cdef"}]}
    parsed = parse_request(COUNT_TOKENS, body)
    assert parsed == ParsedRequest(model="c", prompt_chars=6, max_output_tokens=0, metered=False)
    request = GatewayRequest("r", "/v1/messages/count_tokens", COUNT_TOKENS, {}, body, b"", parsed)
    price = ModelPrice(Decimal(1), Decimal(1))
    held = estimate(request, price, default_max_output_tokens=4096)
    assert (held.prompt_tokens, held.max_output_tokens, held.amount) == (2, 0, Decimal(0))
    metered = GatewayRequest(
        "r",
        "/v1/embeddings",
        EMBEDDINGS,
        {},
        {},
        b"",
        parse_request(EMBEDDINGS, {"model": "e", "input": "x" * 8}),
    )
    assert estimate(metered, price, default_max_output_tokens=4096).amount == Decimal("0.000002")
