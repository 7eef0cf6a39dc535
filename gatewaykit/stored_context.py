"""Stored context of OpenAI responses: what a continuation is billed for (pure functions).

A ``POST /v1/responses`` naming ``previous_response_id`` (or ``conversation``) is billed
by the provider for the whole stored context — every earlier turn's input and output —
on top of its new input. The client's body says nothing about its size, so the gateway
remembers it: when a response settles, the context a continuation of it will be billed
for is stored in the ledger (:class:`~gatewaykit.ledger.base.ResponseContext`), per
response id and per conversation id, owned by the user who created it. The next request
that continues it holds those tokens too, at the dearest input rate.

Everything here is a pure function of the request body, what the ledger returned and
the provider's usage, so any request path can call it:

1. :func:`read_continuation` — which ids the body continues (400 when malformed);
2. :func:`continuation_hold_tokens` — the extra prompt tokens to hold, given what the
   ledger remembers of each id: an unknown id (never seen, expired, or another user's)
   counts the model's whole context window, or is refused under the ``reject`` policy or
   when the model has no context window;
3. :func:`context_to_remember` — after the provider reported usage, the
   ``ResponseContext`` to write with the settle.

docs/adapters.md ("Stored context") describes the policy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from gatewaykit.errors import ConfigurationError, ErrorKind, RequestRejected
from gatewaykit.ledger.base import RESPONSE_CONTEXT_TTL, ResponseContext
from gatewaykit.usage import Usage

__all__ = [
    "ContextPlan",
    "Continuation",
    "UnknownContextPolicy",
    "context_to_remember",
    "continuation_hold_tokens",
    "read_continuation",
]

#: What to do with a continued id the gateway does not know: hold the model's whole
#: context window, or refuse the request (400).
UnknownContextPolicy = Literal["context_window", "reject"]

_MAX_ID = 255
#: A provider's report is never remembered as more than this (a bogus count must not
#: make every later continuation unpayable or overflow a column).
_MAX_TOKENS = 2**40


@dataclasses.dataclass(frozen=True, slots=True)
class Continuation:
    """The stored state a responses request continues, as its body names it."""

    previous_response_id: str | None = None
    conversation_id: str | None = None

    @property
    def ids(self) -> tuple[str, ...]:
        """The ids to look up, each once."""
        ids = (self.previous_response_id, self.conversation_id)
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def __bool__(self) -> bool:
        return bool(self.ids)


def _id(value: object, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestRejected(
            ErrorKind.INVALID_REQUEST,
            f"'{field}' must be a string",
            details={"param": field},
        )
    if len(value) > _MAX_ID or value.isspace():
        raise RequestRejected(
            ErrorKind.INVALID_REQUEST,
            f"'{field}' must be an id of at most {_MAX_ID} characters",
            details={"param": field},
        )
    return value


def read_continuation(body: Mapping[str, Any]) -> Continuation:
    """``previous_response_id`` and ``conversation`` (an id, or ``{"id": ...}``) of a
    responses request body; a malformed one is a 400 ``invalid_request_error``."""
    conversation = body.get("conversation")
    if isinstance(conversation, Mapping):
        conversation = conversation.get("id")
        if conversation is None:
            raise RequestRejected(
                ErrorKind.INVALID_REQUEST,
                "'conversation' must be a conversation id or an object with its 'id'",
                details={"param": "conversation"},
            )
    return Continuation(
        previous_response_id=_id(body.get("previous_response_id"), "previous_response_id"),
        conversation_id=_id(conversation, "conversation"),
    )


def _unknown(field: str, context_id: str, why: str) -> RequestRejected:
    code = (
        "unknown_previous_response" if field == "previous_response_id" else "unknown_conversation"
    )
    what = "previous response" if field == "previous_response_id" else "conversation"
    return RequestRejected(
        ErrorKind.INVALID_REQUEST,
        f"{what} {context_id!r} is not known to this gateway (it was not created through it "
        f"by this user, or it expired); {why}",
        details={"code": code, "param": field},
    )


def continuation_hold_tokens(
    continuation: Continuation,
    known: Mapping[str, int | None],
    *,
    context_window: int | None,
    policy: UnknownContextPolicy = "context_window",
    model: str = "?",
) -> int:
    """The prompt tokens to hold on top of the new input, for the stored context.

    ``known`` maps each of ``continuation.ids`` to the tokens the ledger remembers for it
    and this user (None: unknown). A known id adds its tokens; an unknown one adds the
    model's ``context_window`` — or raises a 400 (``unknown_previous_response`` /
    ``unknown_conversation``) when ``policy`` is ``"reject"`` or the model has no context
    window. The sum never exceeds the context window: no request is billed for more.
    """
    if policy not in ("context_window", "reject"):
        raise ConfigurationError(f"unknown context policy {policy!r}")
    total = 0
    fields = (
        ("previous_response_id", continuation.previous_response_id),
        ("conversation", continuation.conversation_id),
    )
    for field, context_id in fields:
        if context_id is None:
            continue
        tokens = known.get(context_id)
        if tokens is None:
            if policy == "reject":
                raise _unknown(field, context_id, "this gateway refuses unknown stored context")
            if context_window is None:
                raise _unknown(
                    field,
                    context_id,
                    f"model {model!r} has no context_window in the gateway's price table, so "
                    "its cost cannot be bounded",
                )
            tokens = context_window
        total += tokens
    return total if context_window is None else min(total, context_window)


@dataclasses.dataclass(frozen=True, slots=True)
class ContextPlan:
    """What admission learned that settlement needs to remember a response's context.

    ``owner`` is the scope the contexts belong to (``user:<user>``); ``known`` is what the
    ledger remembered of each continued id at admission (None: unknown). ``store`` is the
    request's ``store`` flag: a response the provider does not store cannot be continued,
    so only its conversation (if any) is remembered.
    """

    owner: str
    continuation: Continuation = Continuation()
    known: Mapping[str, int | None] = dataclasses.field(default_factory=dict)
    ttl: float = RESPONSE_CONTEXT_TTL
    store: bool = True


def context_to_remember(
    plan: ContextPlan, usage: Usage, response_id: str | None
) -> ResponseContext | None:
    """The context a continuation of this response (and its conversation) is billed for.

    The provider's input count of a continued response already includes the stored
    context it continued, so the new context is ``max(input, previous) + output`` (input
    counted with its cached and cache-written tokens) — never ``previous + input``, which
    would count every earlier turn again at each turn. A conversation grows by what this
    response added to it: ``max(input - known, 0) + output`` (the ledger adds that to its
    stored figure, so turns that ran at the same time all count). None when there is
    nothing to remember (no response id, or an unstored response outside a conversation).
    """
    conversation = plan.continuation.conversation_id
    remembered_id = response_id if plan.store else None
    if remembered_id is None and conversation is None:
        return None
    known = [t for t in plan.known.values() if t is not None]
    previous = max(known) if known else 0
    prompt = usage.input_tokens + usage.cache_read_tokens + usage.cache_write_tokens
    tokens = min(max(prompt, previous) + usage.output_tokens, _MAX_TOKENS)
    seen = plan.known.get(conversation) if conversation is not None else None
    growth = min(max(prompt - (seen or 0), 0) + usage.output_tokens, _MAX_TOKENS)
    try:
        return ResponseContext(
            plan.owner,
            tokens,
            response_id=remembered_id,
            conversation_id=conversation,
            growth=growth,
            ttl=plan.ttl,
        )
    except ConfigurationError:  # e.g. a provider's id longer than the ledger stores
        return None
