"""The endpoint every adapter is: attempts in order, fallback before the first real event.

One :class:`ProxyEndpoint` per wire format; the format's module supplies a
:class:`FormatSpec` (URL, headers, body, usage readers). For each request the endpoint

1. tries the context's attempts in order, telling the settlement which one is being tried
   (``note_attempt``); a failure before the first real event — connect error, timeout,
   429/5xx, the upstream rejecting the gateway's credential, a malformed or empty
   stream, an in-band error before any output — moves on to the next attempt. Once a
   byte went to the client there is no fallback: ``first_chunk_timeout`` bounds only the
   connect and the wait for the first real event;
2. hands the response to :mod:`gatewaykit.adapters.relay`, which forwards it and settles;
3. relies on :class:`~gatewaykit.middleware.GatewayMiddleware` (which it always runs
   behind: it needs the request's context) to notice a client that leaves: the middleware
   cancels the app, and this module closes the upstream response and charges the usage
   seen so far (shielded).

The response is sent by this package's own ASGI messages, not by Starlette's
``StreamingResponse`` (whose disconnect detection depends on the server's ASGI version).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol

import anyio

from gatewaykit.adapters.reading import EventKind, StreamUsage
from gatewaykit.adapters.relay import (
    BodyReader,
    StreamCut,
    describe,
    read_first,
    relay_body,
    relay_stream,
    send_error,
)
from gatewaykit.context import GatewayContext, get_context
from gatewaykit.envelopes import WireFormat, stream_error_event
from gatewaykit.errors import (
    ConfigurationError,
    ErrorKind,
    MalformedStreamError,
    RequestRejected,
    UpstreamError,
    UpstreamResponseTooLarge,
)
from gatewaykit.http import Timeouts, UpstreamClient, UpstreamResponse, as_upstream_client
from gatewaykit.settlement import Settlement
from gatewaykit.streams import StreamMeter
from gatewaykit.upstream import Attempt, Upstream, header_value_ok

__all__ = [
    "FormatSpec",
    "ProxyEndpoint",
    "base_headers",
    "client_header",
    "forwarded_body",
]

logger = logging.getLogger("gatewaykit.adapters")

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]

RawHeaders = Sequence[tuple[bytes, bytes]]

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_PASSED_HEADERS = frozenset({b"content-type", b"retry-after"})
#: An upstream error body is passed to the client; beyond this it is cut.
_MAX_ERROR_BODY = 1024 * 1024


class FormatSpec(BodyReader, Protocol):
    """One wire format's rules, supplied by its adapter module."""

    wire: WireFormat
    provider: str

    def url(self, upstream: Upstream) -> str: ...

    def headers(self, upstream: Upstream, client_headers: RawHeaders) -> dict[str, str]:
        """Upstream request headers (``client_headers``: the ASGI scope's); RequestRejected
        (400) for a client header that must be forwarded but cannot be sent."""
        ...

    def prepare(self, context: GatewayContext, attempt: Attempt) -> tuple[bytes, StreamUsage]:
        """The upstream body for ``attempt`` and a fresh reader for its stream."""
        ...


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    """Why an attempt failed before the first real event; rendered if it was the last."""

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


class ProxyEndpoint:
    """An ASGI endpoint forwarding one wire format upstream. Build it with the format's
    factory (:func:`gatewaykit.adapters.openai_chat_completions` etc.)."""

    def __init__(
        self,
        spec: FormatSpec,
        *,
        client: UpstreamClient | Any,
        connect_timeout: float | None = 10.0,
        read_timeout: float | None = 600.0,
        write_timeout: float | None = 60.0,
        pool_timeout: float | None = 30.0,
        first_chunk_timeout: float | None = None,
        max_response_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if first_chunk_timeout is not None and not first_chunk_timeout > 0:
            raise ConfigurationError("first_chunk_timeout must be a positive number or None")
        if isinstance(max_response_bytes, bool) or not max_response_bytes > 0:
            raise ConfigurationError("max_response_bytes must be a positive int")
        self.spec = spec
        self.timeouts = Timeouts(
            connect=connect_timeout, read=read_timeout, write=write_timeout, pool=pool_timeout
        )
        self.client = as_upstream_client(client)
        self.first_chunk_timeout = first_chunk_timeout
        self.max_response_bytes = max_response_bytes

    def __repr__(self) -> str:
        return f"<ProxyEndpoint {self.spec.wire.value}>"

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            raise ConfigurationError("gatewaykit adapters serve HTTP requests only")
        await _Exchange(self, get_context(scope), scope, send).run()


class _Exchange:
    """One request through the endpoint. Not reused."""

    __slots__ = ("_send", "context", "endpoint", "meter", "response", "scope", "spec", "started")

    def __init__(
        self, endpoint: ProxyEndpoint, context: GatewayContext, scope: _Scope, send: _Send
    ) -> None:
        self.endpoint = endpoint
        self.spec = endpoint.spec
        self.context = context
        self.scope = scope
        self._send = send
        self.started = False
        self.response: UpstreamResponse | None = None
        self.meter: StreamMeter | None = None

    @property
    def settlement(self) -> Settlement:
        return self.context.settlement

    # -- the frame ------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._serve()
        except anyio.get_cancelled_exc_class():  # the middleware saw the client leave
            with anyio.CancelScope(shield=True):
                await self._close_upstream()
                await self.settlement.on_incomplete(self._consumed())
            raise
        except _ClientGone:
            with anyio.CancelScope(shield=True):
                await self._close_upstream()
                await self.settlement.on_incomplete(self._consumed())
        except Exception as exc:
            logger.exception("gatewaykit adapter failed (request %s)", self.context.request_id)
            with anyio.CancelScope(shield=True):
                await self._close_upstream()
                await self.settlement.on_error(exc, self._consumed())
                await self._send_internal_error()

    async def send(self, message: _Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        try:
            await self._send(message)
        except OSError as exc:
            raise _ClientGone from exc

    def _consumed(self) -> Any:
        return None if self.meter is None else self.meter.consumed()

    async def _close_upstream(self) -> None:
        response, self.response = self.response, None
        if response is not None:
            try:
                await response.aclose()
            except Exception:  # closing a broken connection may fail; nothing to do
                logger.debug("closing the upstream response failed", exc_info=True)

    # -- attempts -------------------------------------------------------------------------
    async def _serve(self) -> None:
        provider = self.spec.provider
        attempts = [a for a in self.context.attempts if a.upstream.provider == provider]
        if not attempts:
            failure = _Failure(
                description="no upstream serves this request",
                retryable=False,
                kind=ErrorKind.NOT_FOUND,
                message=f"no {provider} upstream is configured for model {self.context.model!r}",
            )
        for attempt in attempts:
            self.settlement.note_attempt(attempt)
            failure_or_none = await self._attempt(attempt)
            if failure_or_none is None:
                return
            failure = failure_or_none
            logger.warning(
                "upstream attempt %s for request %s failed: %s",
                attempt.attempt_id,
                self.context.request_id,
                failure.description,
            )
            if not failure.retryable:
                break
        await self.settlement.on_error(failure.description)
        await self._send_failure(failure)

    async def _attempt(self, attempt: Attempt) -> _Failure | None:
        """Run one attempt; None when a response went to the client."""
        spec, context = self.spec, self.context
        try:
            headers = spec.headers(attempt.upstream, self.scope["headers"])
        except RequestRejected as rejection:
            return _Failure(
                description=rejection.message,
                retryable=False,
                kind=rejection.kind,
                message=rejection.message,
            )
        observer = self.settlement.observer
        if observer is not None:  # tracing: the attempt's traceparent goes upstream
            observer.inject(headers)
        body, reader = spec.prepare(context, attempt)
        self.meter = meter = StreamMeter(self.settlement, reader)
        limit = self.endpoint.first_chunk_timeout if context.stream else None
        self.settlement.note_upstream_contacted()
        try:
            # The deadline covers the connect and the first real event, nothing after.
            with anyio.fail_after(limit) if limit is not None else contextlib.nullcontext():
                response = self.response = await self.endpoint.client.request(
                    "POST",
                    spec.url(attempt.upstream),
                    body=body,
                    headers=headers,
                    timeouts=self.endpoint.timeouts,
                )
                status = response.status
                if status >= 400:
                    return await self._status_failure(response)
                streaming = context.stream and not _is_json(response)
                if streaming:
                    chunks = response.chunks()
                    cut = StreamCut(reader)
                    first = await read_first(chunks, cut)
                    if not cut.real and cut.terminal is EventKind.ERROR:
                        # The provider's in-band error came before any output: nothing was
                        # delivered, so this still fails before the first chunk.
                        await self._close_upstream()
                        return self._gateway_failure(
                            f"in-band error before any output: {reader.error}",
                            ErrorKind.UPSTREAM_UNREACHABLE,
                            f"the upstream provider failed: {reader.error}",
                        )
        except (UpstreamError, MalformedStreamError, TimeoutError) as exc:
            await self._close_upstream()
            if isinstance(exc, TimeoutError) and not isinstance(exc, UpstreamError):
                return self._gateway_failure(
                    exc,
                    ErrorKind.UPSTREAM_TIMEOUT,
                    f"the upstream provider sent nothing within {limit} s",
                )
            kind, message = describe(exc)
            code = "upstream_bad_response" if isinstance(exc, MalformedStreamError) else None
            return self._gateway_failure(exc, kind, message, code=code)
        if not streaming:
            # A provider may answer a stream request with one JSON body: it was served
            # (and billed) all the same, so it is passed on and charged.
            return await self._complete(response)
        self.response = response
        await relay_stream(
            send=self.send,
            wire=spec.wire,
            response=response,
            chunks=chunks,
            first=first,
            cut=cut,
            meter=meter,
        )
        self.response = None
        return None

    async def _complete(self, response: UpstreamResponse) -> _Failure | None:
        self.meter = None  # a body's usage is read whole; nothing partial to charge
        try:
            problem = await relay_body(
                send=self.send,
                wire=self.spec.wire,
                response=response,
                reader=self.spec,
                settlement=self.settlement,
                max_bytes=self.endpoint.max_response_bytes,
            )
        except UpstreamResponseTooLarge:
            # Served and billed by the provider, unreadable here: charged as missing usage.
            self.response = None
            await self.settlement.on_first_chunk()
            await self.settlement.on_no_usage()
            await send_error(
                self.send,
                self.spec.wire,
                ErrorKind.UPSTREAM_UNREACHABLE,
                f"the upstream response was larger than the gateway's limit of "
                f"{self.endpoint.max_response_bytes} bytes",
            )
            return None
        except UpstreamError as exc:
            self.response = None
            return self._gateway_failure(exc, *describe(exc))
        self.response = None
        if problem is not None:
            return self._gateway_failure(
                problem, ErrorKind.UPSTREAM_UNREACHABLE, problem, code="upstream_bad_response"
            )
        return None

    def _gateway_failure(
        self, cause: BaseException | str, kind: ErrorKind, message: str, code: str | None = None
    ) -> _Failure:
        detail = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        return _Failure(
            description=f"{message} ({detail})" if detail != message else message,
            retryable=True,
            kind=kind,
            message=message,
            code=code,
        )

    async def _status_failure(self, response: UpstreamResponse) -> _Failure:
        status = response.status
        if status in (401, 403):
            await self._close_upstream()
            # The upstream refused the gateway's own credential: not the client's fault.
            return _Failure(
                description=f"the upstream provider rejected the gateway's credential ({status})",
                retryable=True,
                kind=ErrorKind.UPSTREAM_AUTH,
                message="the upstream provider rejected the gateway's credentials",
            )
        body = await _read_capped(response.chunks(), _MAX_ERROR_BODY)
        kept = tuple(
            (name.lower(), value)
            for name, value in response.raw_headers
            if name.lower() in _PASSED_HEADERS
        )
        await self._close_upstream()
        return _Failure(
            description=f"upstream status {status}",
            retryable=status >= 500 or status in _RETRYABLE_STATUS,
            status=status,
            body=body,
            headers=kept,
        )

    # -- errors -----------------------------------------------------------------------------
    async def _send_failure(self, failure: _Failure) -> None:
        if failure.kind is None:
            headers = [*failure.headers, (b"content-length", str(len(failure.body)).encode())]
            if not any(name == b"content-type" for name, _ in failure.headers):
                headers.append((b"content-type", b"application/json"))
            await self.send(
                {"type": "http.response.start", "status": failure.status, "headers": headers}
            )
            await self.send(
                {"type": "http.response.body", "body": failure.body, "more_body": False}
            )
            return
        details: dict[str, object] | None = None
        if failure.code and self.spec.wire.is_openai:
            details = {"code": failure.code}
        await send_error(self.send, self.spec.wire, failure.kind, failure.message, details)

    async def _send_internal_error(self) -> None:
        message = "the gateway failed while forwarding the request"
        try:
            if not self.started:
                await send_error(self.send, self.spec.wire, ErrorKind.UPSTREAM_UNREACHABLE, message)
            else:
                event = stream_error_event(self.spec.wire, ErrorKind.UPSTREAM_UNREACHABLE, message)
                await self.send({"type": "http.response.body", "body": event, "more_body": False})
        except Exception:  # the response may already be complete; nothing more to say
            logger.debug("could not send the error response", exc_info=True)


async def _read_capped(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """At most ``limit`` bytes of a body (the rest is dropped with the response)."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in chunks:
            parts.append(chunk[: limit - size])
            size += len(parts[-1])
            if size >= limit:
                break
    except UpstreamError:
        pass  # an error body cut short is still the best description there is
    return b"".join(parts)


def _is_json(response: UpstreamResponse) -> bool:
    content_type: str = response.headers.get("content-type", "")
    return content_type.startswith("application/json")


def forwarded_body(
    context: GatewayContext, attempt: Attempt, extra: Mapping[str, Any] | None = None
) -> bytes:
    """The upstream body: the client's own bytes unless the attempt rewrites fields.

    ``extra`` fields are set on top of the client's (and the attempt's model name). Only a
    body that changes is serialised again; ASCII escapes keep any string the client sent
    (even a lone surrogate) encodable.
    """
    raw = context.raw_body
    if raw and attempt.model == context.model:
        if not extra:
            return raw
        if not any(name in context.body for name in extra):
            # New top-level fields only: spliced in after the opening brace, no re-encode.
            start = raw.index(b"{") + 1
            fields = json.dumps(extra, separators=(",", ":")).encode()[1:-1]
            return raw[:start] + fields + b"," + raw[start:]
    body = dict(context.body)
    body["model"] = attempt.model
    if extra:
        body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


def base_headers() -> dict[str, str]:
    """Headers every upstream request carries; the gateway's own credential comes after."""
    return {
        "content-type": "application/json",
        "accept-encoding": "identity",  # bytes are forwarded raw: never let them be compressed
    }


def client_header(headers: RawHeaders, name: bytes) -> str | None:
    """A client header to forward upstream (the first of that name; ``name`` lower-case);
    a 400 when no HTTP client could send it."""
    value = next((v.decode("latin-1") for k, v in headers if k.lower() == name), None)
    if value is not None and not header_value_ok(value):
        raise RequestRejected(
            ErrorKind.INVALID_REQUEST,
            f"the {name.decode()} header holds a control or non-ASCII character",
        )
    return value
