"""The resolve answer is validated by pydantic models: messages name the field, never a value."""

from __future__ import annotations

from typing import Any

import pytest

from gatewaykit.modes.platform_messages import MalformedAnswer, parse_resolve_answer

GOOD = {"attempt_id": "a1", "provider": "openai", "base_url": "https://up.test/v1"}
SECRET = "sk-never-shown-0123456789"


def answer(**attempt: Any) -> dict[str, Any]:
    return {"attempts": [GOOD, {**GOOD, "attempt_id": "a2", **attempt}]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (None, "the answer is not a JSON object"),
        ([GOOD], "the answer is not a JSON object"),
        ({}, "attempts is missing"),
        ({"attempts": []}, "attempts: List should have at least 1 item"),
        ({"attempts": [GOOD, "x"]}, "attempts[1] is not a JSON object"),
        ({"user_id": 7, "attempts": [GOOD]}, "user_id: Input should be a valid string"),
        (answer(attempt_id=" "), "attempts[1].attempt_id: Value error, must not be blank"),
        (answer(attempt_id="a" * 256), "attempts[1].attempt_id: String should have at most 255"),
        (answer(provider="azure"), "attempts[1].provider: Input should be 'openai' or 'anthropic'"),
        (answer(base_url=None), "attempts[1].base_url: Input should be a valid string"),
        (answer(model=""), "attempts[1].model: String should have at least 1 character"),
        (answer(headers=["x"]), "attempts[1].headers is not a JSON object"),
        (answer(headers={"x-h": 1}), "attempts[1].headers.x-h: Input should be a valid string"),
    ],
)
def test_a_malformed_answer_names_the_field(data: Any, message: str) -> None:
    with pytest.raises(MalformedAnswer) as info:
        parse_resolve_answer(data)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "attempt",
    [
        {"api_key": [SECRET]},
        {"headers": {"authorization": [SECRET]}},
        {"provider": SECRET},
        {"attempt_id": SECRET * 20},
    ],
)
def test_a_malformed_answer_never_repeats_a_value(attempt: dict[str, Any]) -> None:
    with pytest.raises(MalformedAnswer) as info:
        parse_resolve_answer(answer(**attempt))
    assert SECRET not in str(info.value)


def test_the_protocol_defaults_and_synonyms() -> None:
    parsed = parse_resolve_answer(
        {
            "request_id": "r1",
            "user_id": "alice",
            "unknown": {"fields": "are ignored"},
            "attempts": [{**GOOD, "provider": "OpenAI-Compatible", "headers": {}, "extra": 1}],
        }
    )
    [attempt] = parsed.attempts
    assert (parsed.request_id, parsed.user_id) == ("r1", "alice")
    assert (attempt.provider, attempt.model, attempt.api_key, attempt.headers) == (
        "openai",
        None,
        None,
        None,
    )
    assert SECRET not in repr(parse_resolve_answer(answer(api_key=SECRET)))
