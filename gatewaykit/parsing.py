"""Reading a gated request body: model, stream flag, prompt size, output cap and user.

Each wire format keeps these in different places; this module knows where. It reads only
what the estimate and the mode need and never rewrites the body. A body it cannot use is a
:class:`~gatewaykit.errors.RequestRejected` with ``ErrorKind.INVALID_REQUEST`` (400).

Prompt size is counted in characters of text the model will read (messages, system
prompt, tool definitions and tool-call arguments); an image or file part counts as a fixed
:data:`ATTACHMENT_CHARS`, since its base64 size says nothing about its token cost.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from gatewaykit.envelopes import WireFormat
from gatewaykit.errors import ErrorKind, RequestRejected

__all__ = [
    "ATTACHMENT_CHARS",
    "MIN_THINKING_BUDGET",
    "Estimator",
    "ParsedRequest",
    "parse_body",
    "parse_request",
]

_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")

#: Characters charged to the estimate for one image/audio/file part (~800 tokens).
ATTACHMENT_CHARS = 3200


@dataclasses.dataclass(frozen=True, slots=True)
class ParsedRequest:
    """What the gateway needs to know about a request before it reaches the provider."""

    model: str
    stream: bool = False
    prompt_chars: int = 0
    max_output_tokens: int | None = None
    user: str | None = None
    #: Completions generated per request (OpenAI chat's ``n``): each may use the output cap.
    choices: int = 1
    #: False for a route the provider does not bill (Anthropic's count_tokens): the mode
    #: authenticates, authorises and rate-limits it like any other, but holds and charges
    #: nothing (docs/adapters.md, "Unmetered routes").
    metered: bool = True


#: A user-supplied parser for a custom gated route: JSON body → :class:`ParsedRequest`.
#: Raise :class:`~gatewaykit.errors.RequestRejected` (or ``ValueError``) to refuse with 400.
Estimator: TypeAlias = Callable[[Mapping[str, Any]], ParsedRequest]


def _invalid(message: str) -> RequestRejected:
    return RequestRejected(ErrorKind.INVALID_REQUEST, message)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _invalid("the request body is not valid JSON") from None
    except RecursionError:
        raise _invalid("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise _invalid("the request body must be a JSON object")
    if b"\\u" in raw and _SURROGATE.search(raw):
        # An escaped surrogate is valid JSON syntax but a lone one is no text at all:
        # no provider accepts it, and no encoder can send it on. (Pairs decode fine.)
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise _invalid("the request body holds a lone UTF-16 surrogate escape") from None
    return data


def parse_request(fmt: WireFormat, body: Mapping[str, Any]) -> ParsedRequest:
    """Read ``body`` as a request in wire format ``fmt``; raises a 400 when it is unusable."""
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _invalid("you must provide a model parameter")
    if fmt is WireFormat.OPENAI_EMBEDDINGS:
        user = _string(body.get("user"), "user")
        return ParsedRequest(
            model=model, prompt_chars=_embedding_chars(body), max_output_tokens=0, user=user
        )
    if fmt is WireFormat.ANTHROPIC_COUNT_TOKENS:
        chars = _anthropic_chars(body)
        return ParsedRequest(model=model, prompt_chars=chars, max_output_tokens=0, metered=False)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean")
    choices: int | None = None
    if fmt is WireFormat.OPENAI_CHAT:
        # Both may be sent; an OpenAI-compatible server may honour either: hold the larger.
        caps = [
            cap
            for cap in (
                _positive_int(body, "max_completion_tokens"),
                _positive_int(body, "max_tokens"),
            )
            if cap is not None
        ]
        limit = max(caps) if caps else None
        chars = _chat_chars(body)
        user = _string(body.get("user"), "user")
        choices = _positive_int(body, "n")
        if choices == 0:
            raise _invalid("'n' must be at least 1")
    elif fmt is WireFormat.ANTHROPIC_MESSAGES:
        limit = _positive_int(body, "max_tokens")
        _check_thinking(body.get("thinking"))
        chars = _anthropic_chars(body)
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise _invalid("'metadata' must be an object")
        user = _string((metadata or {}).get("user_id"), "metadata.user_id")
    else:
        limit = _positive_int(body, "max_output_tokens")
        chars = _responses_chars(body)
        user = _string(body.get("user"), "user")
    return ParsedRequest(
        model=model,
        stream=stream,
        prompt_chars=chars,
        max_output_tokens=limit,
        user=user,
        choices=choices or 1,
    )


#: Anthropic's least ``thinking.budget_tokens`` for ``"type": "enabled"``.
MIN_THINKING_BUDGET = 1024


def _check_thinking(thinking: object) -> None:
    """Refuse an extended-thinking budget Anthropic would refuse, before anything is held.

    The budget is spent inside ``max_tokens`` (which is what is held), so a valid one
    changes nothing here. A budget not below ``max_tokens`` is left to the provider:
    interleaved thinking (a beta header) allows it. Other types pass as they are.
    """
    if thinking is None:
        return
    if not isinstance(thinking, Mapping):
        raise _invalid("'thinking' must be an object")
    if thinking.get("type") != "enabled":
        return
    budget = thinking.get("budget_tokens")
    where = "thinking.enabled.budget_tokens"
    if budget is None:
        raise _invalid(f"{where}: Field required")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise _invalid(f"{where}: Input should be a valid integer")
    if budget < MIN_THINKING_BUDGET:
        raise _invalid(f"{where}: Input should be greater than or equal to {MIN_THINKING_BUDGET}")


def _positive_int(body: Mapping[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _invalid(f"'{field}' must be a non-negative integer")
    return value


def _string(value: object, field: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _invalid(f"'{field}' must be a string")
    return value


def _json_chars(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    try:
        return len(json.dumps(value, separators=(",", ":"), default=str))
    except RecursionError:
        raise _invalid("the request body is nested too deeply") from None


def _parts_chars(content: object) -> int:
    """Text in a content value: a string, or a list of typed parts of any of the formats."""
    if isinstance(content, str):
        return len(content)
    if not isinstance(content, list):
        return _json_chars(content) if isinstance(content, Mapping) else 0
    total = 0
    for part in content:
        if isinstance(part, str):
            total += len(part)
            continue
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if isinstance(part.get("text"), str):
            total += len(part["text"])
        elif kind == "tool_use":
            total += _json_chars(part.get("input")) + len(str(part.get("name", "")))
        elif kind == "tool_result":
            total += _parts_chars(part.get("content"))
        elif kind in ("thinking", "redacted_thinking"):
            total += len(str(part.get("thinking") or part.get("data") or ""))
        elif kind is not None:
            total += ATTACHMENT_CHARS  # image, audio, file, document
    return total


def _chat_chars(body: Mapping[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _invalid("'messages' must be a list")
    total = 0
    for message in messages:
        if not isinstance(message, Mapping):
            raise _invalid("each message must be an object")
        total += _parts_chars(message.get("content"))
        for call in message.get("tool_calls") or ():
            if isinstance(call, Mapping):
                total += _json_chars(call.get("function"))
    # The legacy ``functions`` and the ``prediction`` content are read (and billed) too.
    extras = ("tools", "functions", "response_format", "prediction")
    return total + sum(_json_chars(body.get(field)) for field in extras)


def _anthropic_chars(body: Mapping[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _invalid("'messages' must be a list")
    total = _parts_chars(body.get("system"))
    for message in messages:
        if not isinstance(message, Mapping):
            raise _invalid("each message must be an object")
        total += _parts_chars(message.get("content"))
    return total + _json_chars(body.get("tools"))


def _responses_chars(body: Mapping[str, Any]) -> int:
    items = body.get("input")
    total = _parts_chars(body.get("instructions"))
    if isinstance(items, str):
        total += len(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, Mapping):
                total += _parts_chars(item.get("content"))
                for field in ("arguments", "output"):
                    value = item.get(field)
                    total += len(value) if isinstance(value, str) else _parts_chars(value)
    elif items is not None:
        raise _invalid("'input' must be a string or a list")
    text = body.get("text")  # structured output: text.format carries a JSON schema
    if isinstance(text, Mapping):
        total += _json_chars(text.get("format"))
    return total + _json_chars(body.get("tools"))


def _embedding_chars(body: Mapping[str, Any]) -> int:
    """Characters of embeddings ``input``; a token array counts 4 characters a token, so
    its estimate is its exact length."""
    items = body.get("input")
    if isinstance(items, str):
        return len(items)
    if isinstance(items, list) and items:
        if all(type(item) is int for item in items):
            return 4 * len(items)  # one token array
        total = 0
        for item in items:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, list) and item and all(type(t) is int for t in item):
                total += 4 * len(item)
            else:
                break
        else:
            return total
    raise _invalid("'input' must be a string, a list of strings, or token arrays (non-empty)")
