"""A fake LLM provider speaking the OpenAI chat, Anthropic messages and OpenAI responses
wire formats, for tests, benchmarks and offline examples. It also answers OpenAI
embeddings (one vector per input, :attr:`FakeBehavior.input_tokens` billed per input;
``omit_usage`` and ``fail_status`` apply) and Anthropic's ``count_tokens`` (it counts
``input_tokens``).

It is a plain ASGI app: run it under uvicorn (``uvicorn.run(FakeProvider())``) or call it
in-process through ``httpx.ASGITransport``. Token counts are deterministic, so a test can
assert exact spend: every content event carries one output token, and the prompt costs
:attr:`FakeBehavior.input_tokens` (plus the cache counts). What it does is set by a
:class:`FakeBehavior` — the provider's default, one per model name, or per request in an
``x-fake-behavior`` header holding JSON (an ``Upstream``'s ``headers`` can carry it)::

    provider = FakeProvider(behaviors={"slow": FakeBehavior(delay=0.2)})
    FakeBehavior(fail_status=429)                      # fail before the first chunk
    FakeBehavior(fail_after=2, fail_mode="drop")       # drop the connection mid-stream
    FakeBehavior(omit_usage=True)                      # a stream without usage

Every request is recorded in :attr:`FakeProvider.requests`; streams the client abandoned
are counted in :attr:`FakeProvider.disconnects`.

Like OpenAI, it stores the responses it creates (unless the request says ``"store":
false``) and bills a request that continues one (``previous_response_id``) or a
conversation (``conversation``, seeded by the test in :attr:`FakeProvider.conversations`)
for the stored context on top of its own input: ``input_tokens`` grows by the stored
response's input and output. An unknown previous response is a 400, an unknown
conversation a 404.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Literal

import anyio

from gatewaykit.usage import Usage

__all__ = ["FakeBehavior", "FakeProvider", "ReceivedRequest"]

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]

_Format = Literal[
    "openai_chat",
    "anthropic_messages",
    "openai_responses",
    "openai_embeddings",
    "anthropic_count_tokens",
]
_PATHS: dict[str, _Format] = {
    "/v1/chat/completions": "openai_chat",
    "/chat/completions": "openai_chat",
    "/v1/messages": "anthropic_messages",
    "/v1/responses": "openai_responses",
    "/responses": "openai_responses",
    "/v1/embeddings": "openai_embeddings",
    "/embeddings": "openai_embeddings",
    "/v1/messages/count_tokens": "anthropic_count_tokens",
}
#: Embedding vectors have this many dimensions unless the request asks for ``dimensions``.
EMBEDDING_DIMENSIONS = 8


@dataclasses.dataclass(frozen=True, slots=True)
class FakeBehavior:
    """What the fake provider does with one request. Times are seconds.

    ``events`` content events are streamed (one output token each). ``input_tokens`` are
    the uncached prompt tokens; ``cache_read_tokens``/``cache_write_tokens`` are reported
    in each format's own convention (OpenAI counts cached tokens inside the prompt and has
    no cache writes). ``fail_status`` fails before the first byte with that status and
    ``fail_body`` (default: the format's error envelope). ``fail_after`` fails the stream
    after that many content events: ``fail_mode="drop"`` drops the connection,
    ``"error"`` sends the format's in-band error event and ends. ``malformed="json"``
    sends an event (or a non-streaming body) that is not valid JSON; ``"sse"`` sends bytes
    that are not server-sent events (non-streaming: an HTML body).
    """

    events: int = 4
    input_tokens: int = 12
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    delay: float = 0.0
    first_byte_delay: float = 0.0
    first_event_delay: float = 0.0
    fail_status: int | None = None
    fail_body: bytes | None = None
    retry_after: str | None = None
    fail_after: int | None = None
    fail_mode: Literal["drop", "error"] = "drop"
    omit_usage: bool = False
    malformed: Literal["json", "sse"] | None = None
    text: str = "tok"
    #: Stop at the request's output cap (``max_completion_tokens``/``max_tokens``/
    #: ``max_output_tokens``) as real providers do: fewer events when the cap is lower.
    respect_output_cap: bool = False

    @property
    def output_tokens(self) -> int:
        return self.events

    def expected_usage(self, wire_format: str = "anthropic_messages") -> Usage:
        """The usage gatewaykit should read from a complete response in ``wire_format``."""
        write = self.cache_write_tokens if wire_format == "anthropic_messages" else 0
        return Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=write,
        )

    def piece(self, index: int) -> str:
        """The text of content event ``index``."""
        return f"{self.text}{index} "

    @property
    def output_text(self) -> str:
        return "".join(self.piece(i) for i in range(self.events))


@dataclasses.dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the fake provider saw it (header names lower-cased)."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any


class _Drop(Exception):
    """Internal: end the response without completing it (the connection drops)."""


class FakeProvider:
    """The fake provider ASGI app; see the module docstring.

    ``api_key``: when set, requests must authenticate with it (``Authorization: Bearer``
    or ``x-api-key``), else 401 in the format's envelope. ``behaviors`` maps model names
    to behaviors; ``behavior`` is the default and may be reassigned between requests.
    """

    def __init__(
        self,
        *,
        behavior: FakeBehavior | None = None,
        behaviors: Mapping[str, FakeBehavior] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.behavior = behavior or FakeBehavior()
        self.behaviors = dict(behaviors or {})
        self.api_key = api_key
        self.requests: list[ReceivedRequest] = []
        self.disconnects = 0
        self._ids = itertools.count(1)
        #: Stored responses: id -> the context tokens a continuation is billed for.
        self.stored: dict[str, int] = {}
        #: Conversations: id -> the context tokens a response in it is billed for.
        self.conversations: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<FakeProvider requests={len(self.requests)}>"

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path in ("/healthz", "/health"):
            await _respond(send, 200, b'{"status":"ok"}')
            return
        wire = _PATHS.get(path)
        if wire is None or scope["method"] != "POST":
            await _respond(send, 404, _error_body("openai_chat", 404, f"no route {path}"))
            return
        raw = await _read_body(receive)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        self.requests.append(ReceivedRequest(scope["method"], path, headers, body))
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            await _respond(send, 400, _error_body(wire, 400, "body must be JSON with a model"))
            return
        if self.api_key is not None and not self._authorized(headers):
            await _respond(send, 401, _error_body(wire, 401, "invalid api key"))
            return
        try:
            behavior = self._behavior_for(body["model"], headers)
        except (ValueError, TypeError) as exc:
            message = f"bad x-fake-behavior header: {exc}"
            await _respond(send, 400, _error_body(wire, 400, message))
            return
        cap = _output_cap(body) if behavior.respect_output_cap else None
        if cap is not None and cap < behavior.events:
            behavior = dataclasses.replace(behavior, events=cap)
        if behavior.first_byte_delay:
            await anyio.sleep(behavior.first_byte_delay)
        if behavior.fail_status is not None:
            extra = (
                [(b"retry-after", behavior.retry_after.encode())] if behavior.retry_after else []
            )
            fail_body = behavior.fail_body
            if fail_body is None:
                fail_body = _error_body(wire, behavior.fail_status, "fake provider failure")
            await _respond(send, behavior.fail_status, fail_body, extra)
            return
        if wire == "openai_embeddings":
            await _respond(send, 200, json.dumps(_embeddings(body, behavior)).encode())
            return
        if wire == "anthropic_count_tokens":
            payload = {"input_tokens": behavior.input_tokens}
            await _respond(send, 200, json.dumps(payload).encode())
            return
        if wire == "openai_responses":
            continued = self._continue(body)
            if isinstance(continued, tuple):
                await _respond(send, continued[0], _error_body(wire, *continued))
                return
            behavior = dataclasses.replace(behavior, input_tokens=behavior.input_tokens + continued)
        number = next(self._ids)
        if wire == "openai_responses":
            self._store(body, behavior, number)
        if body.get("stream"):
            await self._stream(wire, body, behavior, number, receive, send)
        else:
            await self._complete(wire, body, behavior, number, send)

    def _continue(self, body: Mapping[str, Any]) -> int | tuple[int, str]:
        """The stored context a responses request is billed for, or (status, message)."""
        extra = 0
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in self.stored:
                return 400, f"Previous response with id '{previous}' not found."
            extra += self.stored[previous]
        conversation = body.get("conversation")
        if isinstance(conversation, Mapping):
            conversation = conversation.get("id")
        if conversation is not None:
            if conversation not in self.conversations:
                return 404, f"Conversation with id '{conversation}' not found."
            extra += self.conversations[conversation]
        return extra

    def _store(self, body: Mapping[str, Any], behavior: FakeBehavior, number: int) -> None:
        """Remember what a continuation of this response (or its conversation) is billed for."""
        context = behavior.input_tokens + behavior.cache_read_tokens + behavior.output_tokens
        if body.get("store", True) is not False:
            self.stored[f"resp_fake_{number}"] = context
        conversation = body.get("conversation")
        if isinstance(conversation, Mapping):
            conversation = conversation.get("id")
        if isinstance(conversation, str):
            self.conversations[conversation] = context

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        key = headers.get("x-api-key")
        if key is None:
            auth = headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else None
        return key == self.api_key

    def _behavior_for(self, model: str, headers: Mapping[str, str]) -> FakeBehavior:
        behavior = self.behaviors.get(model, self.behavior)
        override = headers.get("x-fake-behavior")
        if override:
            fields = json.loads(override)
            if not isinstance(fields, dict):
                raise ValueError("it must be a JSON object of FakeBehavior fields")
            if isinstance(fields.get("fail_body"), str):
                fields["fail_body"] = fields["fail_body"].encode()
            behavior = dataclasses.replace(behavior, **fields)
        return behavior

    # -- non-streaming ------------------------------------------------------------------
    async def _complete(
        self, wire: _Format, body: dict[str, Any], behavior: FakeBehavior, number: int, send: _Send
    ) -> None:
        if behavior.delay:
            await anyio.sleep(behavior.delay * behavior.events)
        if behavior.malformed == "json":
            await _respond(send, 200, b'{"id": "fake-' + str(number).encode() + b'", "choices": [')
            return
        if behavior.malformed == "sse":
            await _respond(send, 200, b"<html>not json</html>", content_type=b"text/html")
            return
        payload = _BUILDERS[wire].complete(body["model"], behavior, number)
        await _respond(send, 200, json.dumps(payload).encode())

    # -- streaming ----------------------------------------------------------------------
    async def _stream(
        self,
        wire: _Format,
        body: dict[str, Any],
        behavior: FakeBehavior,
        number: int,
        receive: _Receive,
        send: _Send,
    ) -> None:
        builder = _BUILDERS[wire]
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        events = builder.stream(body["model"], behavior, number, include_usage)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        disconnected = False
        dropped = False
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                nonlocal disconnected
                while (await receive())["type"] != "http.disconnect":
                    pass
                disconnected = True
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self._pump(events, behavior, send)
            except _Drop:
                dropped = True
            group.cancel_scope.cancel()
        if disconnected:
            self.disconnects += 1
            return
        if not dropped:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # On a drop, returning with the body unfinished makes the server cut the
        # connection (uvicorn logs "ASGI callable returned without completing response").

    async def _pump(self, events: list[bytes | None], behavior: FakeBehavior, send: _Send) -> None:
        if behavior.first_event_delay:
            await anyio.sleep(behavior.first_event_delay)
        for index, event in enumerate(events):
            if event is None:
                raise _Drop
            if index and behavior.delay:
                await anyio.sleep(behavior.delay)
            await send({"type": "http.response.body", "body": event, "more_body": True})


class _Builder:
    """Builds one wire format's bodies and event lists. ``None`` in a list means: drop."""

    wire: _Format

    def complete(self, model: str, behavior: FakeBehavior, number: int) -> dict[str, Any]:
        raise NotImplementedError

    def stream(
        self, model: str, behavior: FakeBehavior, number: int, include_usage: bool
    ) -> list[bytes | None]:
        raise NotImplementedError

    def _inject_failures(
        self, head: list[bytes], content: list[bytes], tail: list[bytes], behavior: FakeBehavior
    ) -> list[bytes | None]:
        events: list[bytes | None] = [*head]
        bad_at = min(1, len(content)) if behavior.malformed is not None else None
        for index in range(len(content) + 1):
            if index == bad_at and behavior.malformed is not None:
                events.append(_MALFORMED[behavior.malformed])
                if behavior.malformed == "sse":
                    return events  # garbage, then the stream just ends
            if index == behavior.fail_after:
                events.append(None if behavior.fail_mode == "drop" else self.error_event())
                return events
            if index < len(content):
                events.append(content[index])
        return [*events, *tail]

    def error_event(self) -> bytes:
        raise NotImplementedError


_MALFORMED = {
    "json": b'data: {"truncated": [\n\n',
    "sse": b"<html>this is not an event stream</html>",
}


def _output_cap(body: Mapping[str, Any]) -> int | None:
    """The smallest output cap a request sets, in any format's field (None: no cap)."""
    caps = [
        body[f]
        for f in ("max_completion_tokens", "max_tokens", "max_output_tokens")
        if isinstance(body.get(f), int) and not isinstance(body.get(f), bool)
    ]
    return min(caps) if caps else None


def _sse(data: Mapping[str, Any], event: str | None = None) -> bytes:
    prefix = f"event: {event}\n".encode() if event else b""
    return prefix + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _ChatBuilder(_Builder):
    wire = "openai_chat"

    @staticmethod
    def _usage(behavior: FakeBehavior) -> dict[str, Any]:
        prompt = behavior.input_tokens + behavior.cache_read_tokens
        return {
            "prompt_tokens": prompt,
            "completion_tokens": behavior.output_tokens,
            "total_tokens": prompt + behavior.output_tokens,
            "prompt_tokens_details": {"cached_tokens": behavior.cache_read_tokens},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }

    def complete(self, model: str, behavior: FakeBehavior, number: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": behavior.output_text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
        }
        if not behavior.omit_usage:
            payload["usage"] = self._usage(behavior)
        return payload

    def stream(
        self, model: str, behavior: FakeBehavior, number: int, include_usage: bool
    ) -> list[bytes | None]:
        base: dict[str, Any] = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        with_usage = include_usage and not behavior.omit_usage
        if include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _sse({**base, "choices": [choice]})

        head = [chunk({"role": "assistant", "content": ""})]
        content = [chunk({"content": behavior.piece(i)}) for i in range(behavior.events)]
        tail = [chunk({}, "stop")]
        if with_usage:
            tail.append(_sse({**base, "choices": [], "usage": self._usage(behavior)}))
        tail.append(b"data: [DONE]\n\n")
        return self._inject_failures(head, content, tail, behavior)

    def error_event(self) -> bytes:
        error = {"message": "fake provider failed mid-stream", "type": "server_error"}
        return _sse({"error": {**error, "param": None, "code": None}})


class _AnthropicBuilder(_Builder):
    wire = "anthropic_messages"

    @staticmethod
    def _usage(behavior: FakeBehavior, output: int) -> dict[str, Any]:
        return {
            "input_tokens": behavior.input_tokens,
            "cache_creation_input_tokens": behavior.cache_write_tokens,
            "cache_read_input_tokens": behavior.cache_read_tokens,
            "output_tokens": output,
        }

    def _message(self, model: str, number: int) -> dict[str, Any]:
        return {
            "id": f"msg_fake_{number}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }

    def complete(self, model: str, behavior: FakeBehavior, number: int) -> dict[str, Any]:
        payload = self._message(model, number)
        payload["content"] = [{"type": "text", "text": behavior.output_text}]
        payload["stop_reason"] = "end_turn"
        if not behavior.omit_usage:
            payload["usage"] = self._usage(behavior, behavior.output_tokens)
        return payload

    def stream(
        self, model: str, behavior: FakeBehavior, number: int, include_usage: bool
    ) -> list[bytes | None]:
        message = self._message(model, number)
        if not behavior.omit_usage:
            message["usage"] = self._usage(behavior, 1)
        head = [
            _sse({"type": "message_start", "message": message}, "message_start"),
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            ),
            _sse({"type": "ping"}, "ping"),
        ]
        content = [
            _sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": behavior.piece(i)},
                },
                "content_block_delta",
            )
            for i in range(behavior.events)
        ]
        delta: dict[str, Any] = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        }
        if not behavior.omit_usage:
            delta["usage"] = {"output_tokens": behavior.output_tokens}
        tail = [
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(delta, "message_delta"),
            _sse({"type": "message_stop"}, "message_stop"),
        ]
        return self._inject_failures(head, content, tail, behavior)

    def error_event(self) -> bytes:
        error = {"type": "overloaded_error", "message": "fake provider overloaded"}
        return _sse({"type": "error", "error": error}, "error")


class _ResponsesBuilder(_Builder):
    wire = "openai_responses"

    @staticmethod
    def _usage(behavior: FakeBehavior) -> dict[str, Any]:
        prompt = behavior.input_tokens + behavior.cache_read_tokens
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": behavior.cache_read_tokens},
            "output_tokens": behavior.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + behavior.output_tokens,
        }

    def _response(self, model: str, number: int, status: str) -> dict[str, Any]:
        return {
            "id": f"resp_fake_{number}",
            "object": "response",
            "created_at": int(time.time()),
            "status": status,
            "model": model,
            "output": [],
            "usage": None,
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "top_p": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "text": {"format": {"type": "text"}},
        }

    @staticmethod
    def _item(number: int, text: str, status: str) -> dict[str, Any]:
        part = {"type": "output_text", "text": text, "annotations": []}
        return {
            "type": "message",
            "id": f"msg_fake_{number}",
            "status": status,
            "role": "assistant",
            "content": [part] if text or status == "completed" else [],
        }

    def complete(self, model: str, behavior: FakeBehavior, number: int) -> dict[str, Any]:
        payload = self._response(model, number, "completed")
        payload["output"] = [self._item(number, behavior.output_text, "completed")]
        if not behavior.omit_usage:
            payload["usage"] = self._usage(behavior)
        return payload

    def stream(
        self, model: str, behavior: FakeBehavior, number: int, include_usage: bool
    ) -> list[bytes | None]:
        sequence = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            return _sse({"type": kind, "sequence_number": next(sequence), **fields}, kind)

        item_id = f"msg_fake_{number}"
        part = {"type": "output_text", "text": "", "annotations": []}
        head = [
            event("response.created", response=self._response(model, number, "in_progress")),
            event("response.in_progress", response=self._response(model, number, "in_progress")),
            event(
                "response.output_item.added",
                output_index=0,
                item=self._item(number, "", "in_progress"),
            ),
            event(
                "response.content_part.added",
                item_id=item_id,
                output_index=0,
                content_index=0,
                part=part,
            ),
        ]
        content = [
            event(
                "response.output_text.delta",
                item_id=item_id,
                output_index=0,
                content_index=0,
                delta=behavior.piece(i),
            )
            for i in range(behavior.events)
        ]
        text = behavior.output_text
        done = self._response(model, number, "completed")
        done["output"] = [self._item(number, text, "completed")]
        if not behavior.omit_usage:
            done["usage"] = self._usage(behavior)
        tail = [
            event(
                "response.output_text.done",
                item_id=item_id,
                output_index=0,
                content_index=0,
                text=text,
            ),
            event(
                "response.content_part.done",
                item_id=item_id,
                output_index=0,
                content_index=0,
                part={**part, "text": text},
            ),
            event("response.output_item.done", output_index=0, item=done["output"][0]),
            event("response.completed", response=done),
        ]
        return self._inject_failures(head, content, tail, behavior)

    def error_event(self) -> bytes:
        return _sse(
            {
                "type": "error",
                "code": "server_error",
                "message": "fake provider failed mid-stream",
                "param": None,
                "sequence_number": 999,
            },
            "error",
        )


_BUILDERS: dict[_Format, _Builder] = {
    "openai_chat": _ChatBuilder(),
    "anthropic_messages": _AnthropicBuilder(),
    "openai_responses": _ResponsesBuilder(),
}

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _embeddings(body: Mapping[str, Any], behavior: FakeBehavior) -> dict[str, Any]:
    """An embeddings answer: one vector per input, ``input_tokens`` billed per input."""
    items = body.get("input")
    if isinstance(items, list) and items and not all(type(t) is int for t in items):
        count = len(items)
    else:
        count = 1  # one string or one token array
    dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
    data = []
    for index in range(count):
        vector = [round((index + 1) / (d + 2), 6) for d in range(dimensions)]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    payload: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
    if not behavior.omit_usage:
        tokens = behavior.input_tokens * count
        payload["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return payload


def _error_body(wire: _Format, status: int, message: str) -> bytes:
    if wire.startswith("anthropic"):
        kind = _ANTHROPIC_TYPES.get(status, "api_error")
        payload: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = _OPENAI_TYPES.get(status, "server_error")
        payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return json.dumps(payload).encode()


async def _respond(
    send: _Send,
    status: int,
    body: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(receive: _Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _lifespan(receive: _Receive, send: _Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def main(argv: list[str] | None = None) -> None:
    """``python -m gatewaykit.testing [--port 8001] [--delay 0.01]``: serve the fake provider."""
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m gatewaykit.testing", description="Serve gatewaykit's fake LLM provider."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--events", type=int, default=4)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds between events")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    provider = FakeProvider(
        behavior=FakeBehavior(events=args.events, delay=args.delay), api_key=args.api_key
    )
    # Idle connections outlive a gateway client's keep-alive (30 s), as a provider's do.
    uvicorn.run(
        provider, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=75
    )
