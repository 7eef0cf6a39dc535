"""The forwarding engine shared by the endpoint adapters.

One :class:`ProxyEndpoint` per wire format; the format's module supplies a
:class:`FormatSpec` (URL, headers, body preparation, usage extraction). For each request
the endpoint:

1. tries the context's attempts in order; a failure before the first chunk (connect
   error, timeout, 429, 5xx, the upstream rejecting the gateway's credential, a malformed
   response) moves on to the next attempt; after the first chunk there is no fallback;
2. forwards the upstream's bytes as they arrive, one ``send`` per upstream read, unchanged
   — except that a read ending inside an event waits for the rest of that event, a chat
   usage chunk the client did not ask for is cut out, and the final event is held back
   until the settlement is done, so a client leaving at the end cannot skip settlement;
3. reads usage on the side and calls the settlement's hooks;
4. relies on :class:`~gatewaykit.middleware.GatewayMiddleware` (which it always runs
   behind: it needs the request's context) to notice a client that leaves: the middleware
   listens for ``http.disconnect`` even while the upstream is silent and cancels the app.
   The cancellation reaches the pending upstream read; the engine then closes the upstream
   response and calls ``on_incomplete`` with the usage seen so far (shielded). A second
   watcher task here would only duplicate that, at a third of a request's cost.

The response is sent by this module's own small ASGI send loop, not by Starlette's
``StreamingResponse`` (whose disconnect detection depends on the server's ASGI version).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol

import anyio

from gatewaykit.adapters.sse import MalformedStreamError, SSEEvent, SSESplitter
from gatewaykit.envelopes import WireFormat, default_status, error_body, stream_error_event
from gatewaykit.errors import ConfigurationError, ErrorKind
from gatewaykit.settlement import GatewayContext, Settlement, get_context
from gatewaykit.upstream import Attempt, Upstream
from gatewaykit.usage import Usage

__all__ = [
    "EventKind",
    "FormatSpec",
    "ProxyEndpoint",
    "StreamUsage",
    "UpstreamClient",
]

logger = logging.getLogger("gatewaykit.adapters")

#: Names the attempt that served (gatewaykit.modes.platform.ATTEMPT_ID_HEADER).
_ATTEMPT_ID_HEADER = "x-gatewaykit-attempt-id"

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]


class UpstreamClient(Protocol):
    """What the adapters need of an HTTP client: ``httpx.AsyncClient`` or ``httpx2``'s."""

    def build_request(
        self,
        method: str,
        url: Any,
        *,
        content: bytes,
        headers: Mapping[str, str],
        timeout: tuple[float | None, float | None, float | None, float | None],
    ) -> Any: ...

    async def send(self, request: Any, *, stream: bool = ...) -> Any: ...


class EventKind(enum.Enum):
    """What the engine does with one upstream event."""

    FORWARD = "forward"  # pass it through
    DROP = "drop"  # cut it out (a usage chunk the client did not ask for)
    FINAL = "final"  # the stream's normal last event: held until settled
    ERROR = "error"  # the provider's own in-band error: held until settled


class StreamUsage:
    """Reads usage from one format's SSE stream; the ``UsageExtractor`` protocol.

    ``feed`` accepts arbitrary chunk boundaries. The engine calls :meth:`observe` per
    complete event instead, to learn what to do with it. ``error`` is the provider's
    in-band error message, if it sent one. ``response_id`` is the provider's id of the
    response, for formats whose responses can be continued later (OpenAI responses).
    """

    response_id: str | None = None

    def __init__(self) -> None:
        self.partial: Usage | None = None
        self.output_chars = 0
        self.error: str | None = None
        self._final: Usage | None = None
        self._splitter = SSESplitter()

    def feed(self, chunk: bytes) -> None:
        for event in self._splitter.feed(chunk):
            self.observe(event)

    def result(self) -> Usage | None:
        return self._final

    def observe(self, event: SSEEvent) -> EventKind:  # pragma: no cover - abstract
        raise NotImplementedError


class FormatSpec(Protocol):
    """One wire format's rules, supplied by its adapter module."""

    wire: WireFormat
    provider: str

    def url(self, upstream: Upstream) -> str: ...

    def headers(self, upstream: Upstream, client_headers: Mapping[str, str]) -> dict[str, str]: ...

    def prepare(self, body: Mapping[str, Any], attempt: Attempt, stream: bool) -> PreparedBody: ...

    def usage_from_body(self, body: Mapping[str, Any]) -> Usage | None: ...

    def output_chars_from_body(self, body: Mapping[str, Any]) -> int: ...

    def response_id_from_body(self, body: Mapping[str, Any]) -> str | None:
        """The id of a response a later request may continue (None for most formats)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PreparedBody:
    """The upstream request body and the extractor for its stream."""

    body: dict[str, Any]
    extractor: Callable[[], StreamUsage]


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    """Why an attempt failed before the first chunk; rendered if it was the last one."""

    description: str
    retryable: bool
    kind: ErrorKind | None = None  # a gateway-made error ...
    message: str = ""
    code: str | None = None
    status: int = 502  # ... or the upstream's own response, passed through
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


class _ClientGone(Exception):
    """Sending to the client failed: it went away."""


_RETRYABLE_STATUS = frozenset({408, 409, 429})
_PASSED_HEADERS = (b"content-type", b"retry-after")
#: An upstream error body is passed to the client; beyond this it is cut (never buffered).
_MAX_ERROR_BODY = 1024 * 1024


def _name_chain(exc: BaseException) -> set[str]:
    # httpx and httpx2 have parallel exception trees; match on class names.
    return {cls.__name__ for cls in type(exc).__mro__}


def _classify(exc: BaseException) -> tuple[ErrorKind, str]:
    names = _name_chain(exc)
    if "ConnectError" in names or "ConnectTimeout" in names:
        return ErrorKind.UPSTREAM_UNREACHABLE, "could not connect to the upstream provider"
    if "TimeoutException" in names or isinstance(exc, TimeoutError):
        return ErrorKind.UPSTREAM_TIMEOUT, "the upstream provider timed out"
    if isinstance(exc, MalformedStreamError):
        return (
            ErrorKind.UPSTREAM_UNREACHABLE,
            f"the upstream provider sent a malformed stream: {exc}",
        )
    return ErrorKind.UPSTREAM_UNREACHABLE, "the connection to the upstream provider failed"


def _is_transport_error(exc: BaseException) -> bool:
    return "TransportError" in _name_chain(exc) or isinstance(exc, (OSError, TimeoutError))


class ProxyEndpoint:
    """An ASGI endpoint forwarding one wire format upstream. Build it with the format's
    factory (:func:`gatewaykit.adapters.openai_chat_completions` etc.)."""

    def __init__(
        self,
        spec: FormatSpec,
        *,
        client: UpstreamClient,
        connect_timeout: float | None = 10.0,
        read_timeout: float | None = 600.0,
        write_timeout: float | None = 60.0,
        pool_timeout: float | None = 30.0,
        first_chunk_timeout: float | None = None,
    ) -> None:
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("read_timeout", read_timeout),
            ("write_timeout", write_timeout),
            ("pool_timeout", pool_timeout),
            ("first_chunk_timeout", first_chunk_timeout),
        ):
            if value is not None and not value > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds or None")
        self.spec = spec
        self.client = client
        self.timeout = (connect_timeout, read_timeout, write_timeout, pool_timeout)
        self.first_chunk_timeout = first_chunk_timeout
        # Parsed URLs by upstream, in the client's own URL type (httpx or httpx2): parsing
        # a URL string is a noticeable share of a request's cost in httpx.
        self._urls: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<ProxyEndpoint {self.spec.wire.value}>"

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            raise ConfigurationError("gatewaykit adapters serve HTTP requests only")
        context = get_context(scope)
        await _Exchange(self, context, scope, send).run()


class _Exchange:
    """One request through the engine. Not reused."""

    def __init__(
        self,
        endpoint: ProxyEndpoint,
        context: GatewayContext,
        scope: _Scope,
        send: _Send,
    ) -> None:
        self.endpoint = endpoint
        self.spec = endpoint.spec
        self.context = context
        self.settlement: Settlement = context.settlement
        self.scope = scope
        self._send = send
        self.started = False
        self.response: Any = None
        self.chunks: AsyncIterator[bytes] | None = None
        self.extractor: StreamUsage | None = None
        self.splitter = SSESplitter()
        self.held: list[bytes] | None = None
        self.terminal: EventKind | None = None
        self.noted_chars = 0
        self.body_usage: Usage | None = None  # a non-streaming response's usage

    # -- the frame ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._serve()
        except anyio.get_cancelled_exc_class():  # the middleware saw the client leave
            with anyio.CancelScope(shield=True):
                await self._close_upstream()
                await self.settlement.on_incomplete(self._partial())
            raise
        except _ClientGone:
            with anyio.CancelScope(shield=True):
                await self._close_upstream()
                await self.settlement.on_incomplete(self._partial())
        except Exception as exc:
            logger.exception("gatewaykit adapter failed (request %s)", self.context.request_id)
            with anyio.CancelScope(shield=True):
                await self._close_upstream()
                await self.settlement.on_error(exc, self._partial())
                await self._send_internal_error()

    async def send(self, message: _Message) -> None:
        try:
            await self._send(message)
        except OSError as exc:
            raise _ClientGone from exc

    async def send_last(self, body: bytes) -> None:
        """Send the response's final message."""
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def _partial(self) -> Usage | None:
        extractor = self.extractor
        if extractor is None:
            return self.body_usage
        self._note(extractor)
        return extractor.result() or extractor.partial

    async def _close_upstream(self) -> None:
        response, self.response = self.response, None
        if response is not None:
            try:
                await response.aclose()
            except Exception:  # closing a broken connection may fail; nothing to do
                logger.debug("closing the upstream response failed", exc_info=True)

    # -- attempts -------------------------------------------------------------------------
    async def _serve(self) -> None:
        attempts = [a for a in self.context.attempts if a.upstream.provider == self.spec.provider]
        failure: _Failure | None = None
        if not attempts:
            failure = _Failure(
                description="no upstream serves this request",
                retryable=False,
                kind=ErrorKind.NOT_FOUND,
                message=f"no {self.spec.provider} upstream is configured for model "
                f"{self.context.model!r}",
            )
            await self.settlement.on_error(failure.description)
            await self._send_failure(failure)
            return
        for attempt in attempts:
            failure = await self._attempt(attempt)
            if failure is None:
                return
            logger.warning(
                "upstream attempt %s for request %s failed: %s",
                attempt.attempt_id,
                self.context.request_id,
                failure.description,
            )
            if not failure.retryable:
                break
        assert failure is not None
        await self.settlement.on_error(failure.description)
        await self._send_failure(failure)

    async def _attempt(self, attempt: Attempt) -> _Failure | None:
        """Run one attempt; None when a response went to the client."""
        if _ATTEMPT_ID_HEADER in self.context.response_headers:
            # A mode that reports per attempt (PlatformMode) asked which one serves.
            self.context.response_headers[_ATTEMPT_ID_HEADER] = attempt.attempt_id
        stream = self.context.stream
        prepared = self.spec.prepare(self.context.body, attempt, stream)
        client_headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.scope["headers"]
        }
        url = self.spec.url(attempt.upstream)
        urls = self.endpoint._urls
        request = self.endpoint.client.build_request(
            "POST",
            urls.get(url, url),
            content=json.dumps(prepared.body, separators=(",", ":"), ensure_ascii=False).encode(),
            headers=self.spec.headers(attempt.upstream, client_headers),
            timeout=self.endpoint.timeout,
        )
        if url not in urls and len(urls) < 1024:
            urls[url] = request.url
        self.extractor = prepared.extractor() if stream else None
        self.splitter = SSESplitter()
        self.held = None
        self.terminal = None
        limit = self.endpoint.first_chunk_timeout if stream else None
        self.settlement.note_upstream_contacted()
        first: bytes | None = b""
        try:
            with anyio.fail_after(limit) if limit is not None else contextlib.nullcontext():
                self.response = await self.endpoint.client.send(request, stream=True)
                status = self.response.status_code
                if status >= 400:
                    body = await _read_capped(self.response, _MAX_ERROR_BODY)
                    headers = tuple(self.response.headers.raw)
                    await self._close_upstream()
                    return self._status_failure(status, body, headers)
                if not stream or _is_json(self.response):
                    # A provider may answer a stream request with one JSON body: it was
                    # served (and billed) all the same, so it is passed on and charged.
                    return await self._complete()
                self.chunks = self.response.aiter_raw()
                first = await self._first_payload()
        except (TimeoutError, MalformedStreamError) as exc:
            await self._close_upstream()
            if isinstance(exc, MalformedStreamError):
                return self._gateway_failure(exc, *_classify(exc), code="upstream_bad_response")
            waited = f"sent nothing within {limit} s" if limit is not None else "timed out"
            return self._gateway_failure(
                exc, ErrorKind.UPSTREAM_TIMEOUT, f"the upstream provider {waited}"
            )
        except Exception as exc:
            if not _is_transport_error(exc):
                raise
            await self._close_upstream()
            return self._gateway_failure(exc, *_classify(exc))
        if first is None:
            await self._close_upstream()
            leftover = self.splitter.pending
            reason = "an empty stream" if not leftover else "bytes that are not server-sent events"
            return self._gateway_failure(
                reason,
                ErrorKind.UPSTREAM_UNREACHABLE,
                f"the upstream provider sent {reason}",
                code="upstream_bad_response",
            )
        if not first and self.terminal is EventKind.ERROR:
            # The provider's in-band error came before any output: nothing was delivered,
            # so this is still a failure before the first chunk (next attempt, refund).
            await self._close_upstream()
            error = self.extractor.error if self.extractor else None
            return self._gateway_failure(
                f"in-band error before any output: {error}",
                ErrorKind.UPSTREAM_UNREACHABLE,
                f"the upstream provider failed: {error}",
            )
        await self._stream(first)
        return None

    def _gateway_failure(
        self, cause: BaseException | str, kind: ErrorKind, message: str, code: str | None = None
    ) -> _Failure:
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        return _Failure(
            description=f"{message} ({detail})",
            retryable=True,
            kind=kind,
            message=message,
            code=code,
        )

    def _status_failure(
        self, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...]
    ) -> _Failure:
        if status in (401, 403):
            # The upstream refused the gateway's own credential: not the client's fault.
            return _Failure(
                description=f"the upstream provider rejected the gateway's credential ({status})",
                retryable=True,
                kind=ErrorKind.UPSTREAM_AUTH,
                message="the upstream provider rejected the gateway's credentials",
            )
        kept = tuple((k.lower(), v) for k, v in headers if k.lower() in _PASSED_HEADERS)
        return _Failure(
            description=f"upstream status {status}",
            retryable=status >= 500 or status in _RETRYABLE_STATUS,
            status=status,
            body=body,
            headers=kept,
        )

    # -- non-streaming --------------------------------------------------------------------
    async def _complete(self) -> _Failure | None:
        response = self.response
        body = await response.aread()
        content_type = response.headers.get("content-type", "application/json")
        status = response.status_code
        await self._close_upstream()
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return self._gateway_failure(
                "not a JSON object",
                ErrorKind.UPSTREAM_UNREACHABLE,
                "the upstream provider sent a malformed JSON response",
                code="upstream_bad_response",
            )
        try:
            usage = self.spec.usage_from_body(payload)
        except (TypeError, ValueError, AttributeError) as exc:
            return self._gateway_failure(
                exc,
                ErrorKind.UPSTREAM_UNREACHABLE,
                "the upstream provider sent malformed usage",
                code="upstream_bad_response",
            )
        self.settlement.note_output(self.spec.output_chars_from_body(payload))
        response_id = self.spec.response_id_from_body(payload)
        if response_id is not None:
            self.settlement.note_response(response_id)
        self.body_usage = usage
        await self.settlement.on_first_chunk()
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
        ]
        # The body goes out before settling (a ledger commit, perhaps an fsync), so the
        # client is not kept waiting for it; the empty final message still waits for it.
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True
        await self.send({"type": "http.response.body", "body": body, "more_body": True})
        if usage is not None:
            await self.settlement.on_success(usage)
        else:
            await self.settlement.on_no_usage()
        await self.send_last(b"")
        return None

    # -- streaming ------------------------------------------------------------------------
    async def _first_payload(self) -> bytes | None:
        """Read until there is something to send (or a held final event). None: EOF first."""
        assert self.chunks is not None
        async for chunk in self.chunks:
            out = self._process(chunk)
            if out or self.held is not None:
                return out
        return None

    def _process(self, chunk: bytes) -> bytes:
        """The part of ``chunk`` to forward now; updates usage, the held tail, the notes."""
        extractor = self.extractor
        assert extractor is not None
        aligned = not self.splitter.pending  # does this read start at an event boundary?
        events = self.splitter.feed(chunk)
        if self.held is not None:
            for event in events:  # still read usage (e.g. response.failed after error)
                extractor.observe(event)
            self.held.append(chunk)
            return b""
        whole = True
        out: list[bytes] = []
        for index, event in enumerate(events):
            kind = extractor.observe(event)
            if kind is EventKind.FORWARD:
                out.append(event.raw)
                continue
            whole = False
            if kind is EventKind.DROP:
                continue
            self.terminal = kind
            self.held = [e.raw for e in events[index:]]
            for later in events[index + 1 :]:
                extractor.observe(later)
            self.held.append(self.splitter.pending)
            break
        self._note(extractor)
        if whole and aligned and not self.splitter.pending:
            return chunk  # the common case: forwarded as received, no copy
        return b"".join(out)

    def _note(self, extractor: StreamUsage) -> None:
        if extractor.output_chars > self.noted_chars:
            self.settlement.note_output(extractor.output_chars - self.noted_chars)
            self.noted_chars = extractor.output_chars
        if extractor.partial is not None and extractor.partial is not self.settlement.partial_usage:
            self.settlement.note_usage(extractor.partial)
        if extractor.response_id is not None and self.settlement.response_id is None:
            self.settlement.note_response(extractor.response_id)

    async def _stream(self, first: bytes) -> None:
        assert self.chunks is not None
        assert self.extractor is not None
        content_type = self.response.headers.get("content-type", "text/event-stream")
        await self.settlement.on_first_chunk()
        headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True
        if first:
            await self.send({"type": "http.response.body", "body": first, "more_body": True})
        failure: BaseException | None = None
        try:
            async for chunk in self.chunks:
                out = self._process(chunk)
                if out:
                    await self.send({"type": "http.response.body", "body": out, "more_body": True})
            out = self._process_leftover()
            if out:
                await self.send({"type": "http.response.body", "body": out, "more_body": True})
        except MalformedStreamError as exc:
            failure = exc
        except Exception as exc:
            if not _is_transport_error(exc):
                raise
            failure = exc
        await self._close_upstream()
        await self._finish(failure)

    def _process_leftover(self) -> bytes:
        """At the end of the stream: a last event missing its blank line still counts."""
        leftover = self.splitter.pending
        if not leftover or self.held is not None:
            return b""
        assert self.extractor is not None
        self.splitter = SSESplitter()
        kind = self.extractor.observe(SSEEvent(leftover))
        self._note(self.extractor)
        if kind is EventKind.FORWARD:
            return leftover
        if kind is not EventKind.DROP:
            self.terminal = kind
            self.held = [leftover]
        return b""

    async def _finish(self, failure: BaseException | None) -> None:
        """Settle, then send the held final event (or an in-band error) and end."""
        extractor = self.extractor
        assert extractor is not None
        self._note(extractor)
        usage = extractor.result()
        tail = b"".join(self.held or ())
        if self.terminal is EventKind.FINAL or (failure is None and usage is not None):
            if failure is not None:
                logger.info("upstream failed after its final event: %r", failure)
            if usage is not None:
                await self.settlement.on_success(usage)
            else:
                await self.settlement.on_no_usage()
        elif self.terminal is EventKind.ERROR:
            await self.settlement.on_error(
                f"upstream error: {extractor.error or 'in-band error event'}",
                usage or extractor.partial,
            )
        else:
            if failure is None:
                failure = MalformedStreamError("the stream ended before its final event")
            kind, message = _classify(failure)
            await self.settlement.on_error(
                f"{message} ({type(failure).__name__}: {failure})", usage or extractor.partial
            )
            tail = stream_error_event(self.spec.wire, kind, message)
        await self.send_last(tail)

    # -- errors -----------------------------------------------------------------------------
    async def _send_failure(self, failure: _Failure) -> None:
        if failure.kind is None:
            headers = [*failure.headers, (b"content-length", str(len(failure.body)).encode())]
            if not any(k == b"content-type" for k, _ in failure.headers):
                headers.append((b"content-type", b"application/json"))
            await self._respond(failure.status, failure.body, headers)
            return
        details = {"code": failure.code} if failure.code and self.spec.wire.is_openai else None
        body = error_body(self.spec.wire, failure.kind, failure.message, details)
        status = default_status(failure.kind)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        await self._respond(status, body, headers)

    async def _respond(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.started = True
        await self.send_last(body)

    async def _send_internal_error(self) -> None:
        message = "the gateway failed while forwarding the request"
        try:
            if not self.started:
                body = error_body(self.spec.wire, ErrorKind.UPSTREAM_UNREACHABLE, message)
                headers = [(b"content-type", b"application/json")]
                await self._respond(502, body, headers)
            else:
                event = stream_error_event(self.spec.wire, ErrorKind.UPSTREAM_UNREACHABLE, message)
                await self.send_last(event)
        except Exception:  # the response may already be complete; nothing more to say
            logger.debug("could not send the error response", exc_info=True)


# -- helpers for the format modules ----------------------------------------------------------
async def _read_capped(response: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of a response body (the rest is dropped with the response)."""
    parts: list[bytes] = []
    size = 0
    chunk: bytes
    async for chunk in response.aiter_raw():
        parts.append(chunk[: limit - size])
        size += len(parts[-1])
        if size >= limit:
            break
    return b"".join(parts)


def _is_json(response: Any) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("application/json")


def count(value: object) -> int:
    """A token count from a provider's JSON: a non-negative int, else 0."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def readable(usage: dict[str, Any], *fields: str) -> bool:
    """Whether a usage object states at least one of ``fields`` as a token count.

    A usage object with none of them is unreadable: it must be treated as missing usage
    (the missing-usage policy applies), never as zero tokens.
    """
    return any(
        isinstance(usage.get(field), int) and not isinstance(usage.get(field), bool)
        for field in fields
    )


def openai_usage(usage: Any, prompt_field: str, output_field: str) -> Usage | None:
    """``Usage`` from an OpenAI usage object: chat names its counts ``prompt_tokens`` /
    ``completion_tokens``, responses ``input_tokens`` / ``output_tokens``; both report
    cached prompt tokens in ``<prompt_field>_details.cached_tokens`` (part of the prompt).
    """
    if not isinstance(usage, dict) or not readable(usage, prompt_field, output_field):
        return None
    prompt = count(usage.get(prompt_field))
    details = usage.get(f"{prompt_field}_details")
    cached = count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = min(cached, prompt)
    return Usage(
        input_tokens=prompt - cached,
        output_tokens=count(usage.get(output_field)),
        cache_read_tokens=cached,
    )


def text_len(value: object) -> int:
    return len(value) if isinstance(value, str) else 0


def base_headers() -> dict[str, str]:
    """Headers every upstream request carries; the gateway's own credential comes after."""
    return {
        "content-type": "application/json",
        "accept-encoding": "identity",  # bytes are forwarded raw: never let them be compressed
    }
