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


def test_parse_body() -> None:
    assert parse_body(b'{"a": 1}') == {"a": 1}
    for raw in (b"", b"null", b"[]", b"\x80"):
        with pytest.raises(RequestRejected):
            parse_body(raw)
