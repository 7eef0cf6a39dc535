"""The pure functions of stored-context accounting (gatewaykit.stored_context)."""

from __future__ import annotations

from typing import Any

import pytest

from gatewaykit.errors import ErrorKind, RequestRejected
from gatewaykit.ledger.base import ResponseContext
from gatewaykit.stored_context import (
    ContextPlan,
    Continuation,
    context_to_remember,
    continuation_hold_tokens,
    read_continuation,
)
from gatewaykit.usage import Usage


def test_read_continuation() -> None:
    assert not read_continuation({"model": "m", "input": "hi"})
    assert read_continuation({"previous_response_id": "resp_1"}) == Continuation("resp_1")
    assert read_continuation({"previous_response_id": ""}) == Continuation()
    assert read_continuation({"conversation": "conv_1"}).ids == ("conv_1",)
    assert read_continuation({"conversation": {"id": "conv_1"}}).ids == ("conv_1",)
    both = read_continuation({"previous_response_id": "x", "conversation": "x"})
    assert both.ids == ("x",)  # looked up once


@pytest.mark.parametrize(
    "body",
    [
        {"previous_response_id": 5},
        {"previous_response_id": ["resp_1"]},
        {"previous_response_id": "r" * 256},
        {"conversation": {"name": "no id"}},
        {"conversation": {"id": 7}},
        {"conversation": 3},
    ],
)
def test_malformed_continuations_are_400(body: dict[str, Any]) -> None:
    with pytest.raises(RequestRejected) as info:
        read_continuation(body)
    assert info.value.kind is ErrorKind.INVALID_REQUEST
    assert info.value.details["param"] in ("previous_response_id", "conversation")


def test_known_contexts_are_held_and_capped_by_the_window() -> None:
    chained = Continuation("resp_1")
    assert continuation_hold_tokens(chained, {"resp_1": 5000}, context_window=None) == 5000
    assert continuation_hold_tokens(chained, {"resp_1": 5000}, context_window=128) == 128
    assert continuation_hold_tokens(Continuation(), {}, context_window=None) == 0
    both = Continuation("resp_1", "conv_1")
    known = {"resp_1": 10, "conv_1": 20}
    assert continuation_hold_tokens(both, known, context_window=1000) == 30


def test_an_unknown_id_is_held_at_the_context_window() -> None:
    chained = Continuation("resp_x")
    assert continuation_hold_tokens(chained, {"resp_x": None}, context_window=128_000) == 128_000
    assert continuation_hold_tokens(chained, {}, context_window=64) == 64


@pytest.mark.parametrize(
    ("continuation", "code", "param"),
    [
        (Continuation("resp_x"), "unknown_previous_response", "previous_response_id"),
        (Continuation(conversation_id="conv_x"), "unknown_conversation", "conversation"),
    ],
)
def test_an_unknown_id_is_refused_by_policy_or_without_a_window(
    continuation: Continuation, code: str, param: str
) -> None:
    for window, policy in ((128, "reject"), (None, "context_window"), (None, "reject")):
        with pytest.raises(RequestRejected) as info:
            continuation_hold_tokens(
                continuation,
                {},
                context_window=window,
                policy=policy,  # type: ignore[arg-type]
                model="m",
            )
        assert info.value.status == 400
        assert info.value.details == {"code": code, "param": param}
        # The message never says whether the id exists for someone else.
        assert "not known to this gateway" in info.value.message
    # A known id is fine under either policy, window or not.
    known = dict.fromkeys(continuation.ids, 7)
    assert continuation_hold_tokens(continuation, known, context_window=None, policy="reject") == 7


def test_context_to_remember_after_a_first_response() -> None:
    plan = ContextPlan("user:alice")
    usage = Usage(input_tokens=90, output_tokens=30, cache_read_tokens=10, cache_write_tokens=5)
    assert context_to_remember(plan, usage, "resp_1") == ResponseContext(
        "user:alice", 135, response_id="resp_1", growth=135
    )
    assert context_to_remember(plan, usage, None) is None  # no id: nothing to continue
    unstored = ContextPlan("user:alice", store=False)
    assert context_to_remember(unstored, usage, "resp_1") is None


def test_a_continuation_does_not_count_the_stored_context_twice() -> None:
    """The provider's input of a continued response already contains the stored context."""
    plan = ContextPlan("user:alice", Continuation("resp_1"), {"resp_1": 1000})
    usage = Usage(input_tokens=1020, output_tokens=40)  # 1000 stored + 20 new
    context = context_to_remember(plan, usage, "resp_2")
    assert context is not None
    assert context.tokens == 1060  # not 1000 + 1020 + 40
    # A provider reporting less than was stored (e.g. truncation) never shrinks the bound.
    context = context_to_remember(plan, Usage(input_tokens=300, output_tokens=40), "resp_2")
    assert context is not None
    assert context.tokens == 1040


def test_a_conversation_turn_grows_it_by_what_it_added() -> None:
    plan = ContextPlan("user:alice", Continuation(conversation_id="conv_1"), {"conv_1": 1000})
    context = context_to_remember(plan, Usage(input_tokens=1020, output_tokens=40), "resp_2")
    assert context == ResponseContext(
        "user:alice", 1060, response_id="resp_2", conversation_id="conv_1", growth=60
    )
    # An unstored response in a conversation: only the conversation is remembered.
    unstored = ContextPlan("user:alice", plan.continuation, plan.known, store=False)
    context = context_to_remember(unstored, Usage(input_tokens=1020, output_tokens=40), None)
    assert context is not None
    assert (context.ids, context.tokens, context.growth) == (("conv_1",), 1060, 60)
    # A conversation the gateway did not know: it grows by everything the provider billed.
    unknown = ContextPlan("user:alice", plan.continuation, {"conv_1": None})
    context = context_to_remember(unknown, Usage(input_tokens=1020, output_tokens=40), "r")
    assert context is not None
    assert (context.tokens, context.growth) == (1060, 1060)


def test_bogus_counts_are_bounded() -> None:
    plan = ContextPlan("user:alice")
    context = context_to_remember(plan, Usage(input_tokens=2**62, output_tokens=2**62), "r")
    assert context is not None
    assert context.tokens == 2**40
    assert context_to_remember(plan, Usage(1, 1), "r" * 300) is None
