"""GatewayMiddleware: admits gated LLM requests and guarantees each is settled once.

A pure ASGI middleware (docs/middleware.md). For a gated route (POST to a configured path) it

1. reads the body once, capped at ``max_body_bytes`` (413 beyond), and parses it for the
   route's wire format (400 when unusable);
2. asks the mode (``StandaloneMode``, ``PlatformMode`` or your own
   :class:`~gatewaykit.modes.base.RequestModeStrategy`) to admit it; a
   :class:`~gatewaykit.errors.RequestRejected` becomes an error in the route's own
   envelope (OpenAI or Anthropic), so official SDKs raise the right exception;
3. stores the :class:`~gatewaykit.context.GatewayContext` in ``scope["gatewaykit"]``
   (read it with ``get_settlement(request)``), replays the body to the app, and adds the
   context's response headers and the request id to ``http.response.start``;
4. settles the request exactly once whatever happens — see *Backstop* below.

A ``GET`` of ``models_path`` (``/v1/models``, ``/v1/models/{id}``) is authenticated by the
mode and given the models its key may use (:mod:`gatewaykit.listing`); nothing is held.
Everything else (other paths and methods, websockets, lifespan) passes through untouched.

Contract for endpoint handlers (adapters and custom handlers)
--------------------------------------------------------------
* **Observations.** Call ``settlement.note_upstream_contacted()`` just before the request
  leaves for the provider, and keep ``note_usage(partial)`` / ``note_output(chars)``
  current while streaming (:func:`gatewaykit.streams.settle_stream` does the latter).
  They are what a stream that never finishes is charged on.
* **Disconnects.** The middleware itself listens for ``http.disconnect`` from the moment
  the body has been read, even while the upstream is silent. When the client goes away
  before the response is complete it *cancels the app* (an anyio cancel scope around the
  app call): the handler's pending upstream read raises the cancellation, its
  ``async with`` blocks close the upstream response, and the middleware then calls
  ``on_incomplete()`` shielded from cancellation. A handler therefore needs no disconnect
  logic of its own; it must not swallow the cancellation. Handlers that poll instead
  still can: after the replayed body, every ``receive()`` the app makes returns
  ``http.disconnect`` as soon as the middleware has seen it (the one server message is
  handed to every caller), so Starlette's own ``listen_for_disconnect`` keeps working.
  A disconnect after the final body message was sent cancels nothing (background tasks
  run on).
* **Hooks.** Settle with the settlement's hooks; call ``on_first_chunk()`` before the first
  byte of a successful response goes out and settle before sending the final message
  where you can. The first terminal hook wins, so settling "too much" is harmless.

Backstop (when the handler did not settle)
------------------------------------------
=============================================  ==========================================
the app …                                       the middleware calls
=============================================  ==========================================
returns after a 2xx/3xx response                ``on_no_usage()`` (missing-usage policy)
returns after a ≥400 response / no response     ``on_error(...)`` (refund before commit)
raises before the response started              ``on_error(exc)`` (refund), re-raises
raises after the response started               ``on_error(exc)``, re-raises
is cancelled by a client disconnect             ``on_incomplete()`` (disconnect policy)
is cancelled from outside (shutdown)            ``on_incomplete()``, cancellation propagates
is cancelled while being admitted               (admission finishes) ``on_incomplete()``;
                                                a ``cancel_safe`` mode undoes it itself
=============================================  ==========================================

The first non-empty body chunk of a response with status < 400 marks the settlement
committed (``on_first_chunk``) if the handler did not, so a later failure is charged for
what was delivered rather than refunded. While the response is alive the middleware calls
``settlement.heartbeat()`` every ``heartbeat_interval`` seconds (default: the settlement's
own ``heartbeat_interval`` attribute, a third of the hold TTL in standalone mode) so the
hold cannot expire under a long stream.

Precedence: a body that cannot be parsed (400/413) is reported only after the credential
was checked, when the mode offers ``authenticate(headers)`` (:class:`SupportsAuthenticate`),
so 401 wins over 400 (docs/errors.md).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gatewaykit.context import SCOPE_KEY, GatewayContext
from gatewaykit.envelopes import WireFormat, error_body
from gatewaykit.errors import (
    ConfigurationError,
    ErrorKind,
    LedgerError,
    RequestRejected,
)
from gatewaykit.listing import admit_listing, is_listing_path
from gatewaykit.modes.base import GatewayRequest, RequestModeStrategy
from gatewaykit.parsing import Estimator, ParsedRequest, parse_body, parse_request
from gatewaykit.settlement import Settlement

if TYPE_CHECKING:
    from gatewaykit.denials import DenialCounter
    from gatewaykit.observability.probe import Instruments, RequestProbe
    from gatewaykit.observability.recorder import MetricsRecorder
    from gatewaykit.observability.tracing import OpenTelemetryTracing

__all__ = ["DEFAULT_ROUTES", "GatewayMiddleware", "SupportsAuthenticate"]

logger = logging.getLogger("gatewaykit.middleware")

#: The gated routes when none are given: the provider endpoints the adapters serve.
DEFAULT_ROUTES: Mapping[str, WireFormat] = {
    "/v1/chat/completions": WireFormat.OPENAI_CHAT,
    "/v1/messages": WireFormat.ANTHROPIC_MESSAGES,
    "/v1/responses": WireFormat.OPENAI_RESPONSES,
    "/v1/embeddings": WireFormat.OPENAI_EMBEDDINGS,
    "/v1/messages/count_tokens": WireFormat.ANTHROPIC_COUNT_TOKENS,
}

_UNAVAILABLE = "the budget ledger is unavailable; please retry shortly"
_LISTING_METHODS = frozenset({"GET", "HEAD"})


@runtime_checkable
class SupportsAuthenticate(Protocol):
    """Optional mode method: check the credential alone (raise RequestRejected 401).

    Called only when the body could not be parsed, so that a bad credential is reported
    before a bad body (401 > 400).
    """

    async def authenticate(self, headers: Mapping[str, str]) -> object: ...


class GatewayMiddleware:
    """Pure ASGI middleware that gates LLM routes; see the module docstring.

    ``routes`` maps a path to its :class:`~gatewaykit.envelopes.WireFormat`, or to an
    :data:`~gatewaykit.parsing.Estimator` (a callable that parses a custom route's JSON
    body; its errors use the OpenAI envelope). The request id (also the hold id) is
    generated by ``request_id_factory`` — never taken from the client, since it is an
    idempotency key — and returned in ``request_id_header``. ``models_path`` is where
    models are listed (None: not at all).

    ``metrics`` (a :class:`~gatewaykit.observability.MetricsRecorder`, e.g.
    :class:`~gatewaykit.observability.PrometheusMetrics`) and ``tracing``
    (:class:`~gatewaykit.observability.OpenTelemetryTracing`) observe every gated request;
    left None (the default) they cost nothing: no call, no allocation. ``denials`` (a
    :class:`~gatewaykit.denials.DenialCounter`) counts every refusal for the admin page.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        mode: RequestModeStrategy,
        routes: Mapping[str, WireFormat | Estimator] | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
        request_id_header: str = "x-request-id",
        heartbeat_interval: float | None = None,
        request_id_factory: Callable[[], str] | None = None,
        models_path: str | None = "/v1/models",
        metrics: MetricsRecorder | None = None,
        tracing: OpenTelemetryTracing | None = None,
        denials: DenialCounter | None = None,
    ) -> None:
        if not isinstance(mode, RequestModeStrategy):
            raise ConfigurationError(
                f"mode must be a RequestModeStrategy (an object with async resolve(request)), "
                f"got {type(mode).__name__}"
            )
        table: dict[str, WireFormat | Estimator] = {}
        for path, route in (DEFAULT_ROUTES if routes is None else routes).items():
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError(f"gated route paths must start with '/': {path!r}")
            if isinstance(route, str) and route in {f.value for f in WireFormat}:
                route = WireFormat(route)
            if not isinstance(route, WireFormat) and not callable(route):
                raise ConfigurationError(
                    f"route {path!r} must map to a WireFormat or an estimator callable"
                )
            table[path] = route
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int):
            raise ConfigurationError("max_body_bytes must be a positive int")
        if max_body_bytes <= 0:
            raise ConfigurationError("max_body_bytes must be a positive int")
        if heartbeat_interval is not None and not heartbeat_interval > 0:
            raise ConfigurationError("heartbeat_interval must be a positive number of seconds")
        if models_path is not None and (
            not models_path.startswith("/") or models_path.endswith("/")
        ):
            raise ConfigurationError(
                f"models_path must start and not end with '/': {models_path!r}"
            )
        if not request_id_header or request_id_header != request_id_header.strip():
            raise ConfigurationError(f"invalid request_id_header {request_id_header!r}")
        self.app = app
        self.mode = mode
        self.routes: Mapping[str, WireFormat | Estimator] = table
        self.max_body_bytes = max_body_bytes
        self.request_id_header = request_id_header.lower()
        self.request_id_header_raw = self.request_id_header.encode("latin-1")
        self.heartbeat_interval = heartbeat_interval
        self.request_id_factory = request_id_factory or _new_request_id
        self.models_path = models_path
        #: The mode declares its resolve cancellation-safe (RequestModeStrategy): awaited
        #: in the request's own task, with no task and shield of its own.
        self.resolve_directly = _declares_cancel_safe(mode)
        self.metrics = metrics
        self.tracing = tracing
        self.denials = denials
        self._instruments: Instruments | None = None
        if metrics is not None or tracing is not None:
            from gatewaykit.observability.probe import Instruments
            from gatewaykit.observability.recorder import MetricsRecorder

            if metrics is not None and not isinstance(metrics, MetricsRecorder):
                raise ConfigurationError(
                    "metrics must be a MetricsRecorder (e.g. gatewaykit.observability."
                    f"PrometheusMetrics), got {type(metrics).__name__}"
                )
            self._instruments = Instruments(metrics, tracing)
        #: Admissions of cancelled requests, and their settlements being closed (see
        #: _GatedCall.run): referenced here until done, so none is collected mid-run.
        self._closing: set[asyncio.Future[Any]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            models = self.models_path
            if (
                models
                and scope.get("method") in _LISTING_METHODS
                and is_listing_path(scope, models)
            ):
                await admit_listing(self.mode, self.app, scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        route = self._match(scope)
        if route is None:
            await self.app(scope, receive, send)
            return
        if self._instruments is None:
            await _GatedCall(self, scope, receive, send, route).run()
        else:
            await _GatedCall(self, scope, receive, send, route).run_observed(self._instruments)

    def _abandon(self, admission: asyncio.Future[GatewayContext]) -> None:
        """An admission whose request was cancelled meanwhile: close its settlement."""
        if admission.cancelled() or admission.exception() is not None:
            return  # nothing was admitted (a refusal or a failure)
        settlement = admission.result().settlement
        task = asyncio.ensure_future(settlement.on_incomplete())
        self._closing.add(task)  # kept referenced until it is done
        task.add_done_callback(self._closing.discard)

    def _match(self, scope: Scope) -> WireFormat | Estimator | None:
        path: str = scope["path"]
        route = self.routes.get(path)
        root: str = scope.get("root_path", "")
        if route is None and root and path.startswith(root):
            route = self.routes.get(path[len(root) :])
        return route


def _declares_cancel_safe(mode: object) -> bool:
    """The mode's own class says its resolve undoes a cancelled admission. Inherited, it
    says nothing: a subclass that overrides ``resolve`` may await after the hold."""
    return "cancel_safe" in vars(type(mode)) and getattr(mode, "cancel_safe", False) is True


def _new_request_id() -> str:
    # Unique, not secret: 128 bits from the process's PRNG (reseeded after a fork) cost
    # a tenth of secrets.token_hex, which asks the kernel on every request.
    return f"req_{random.getrandbits(128):032x}"


class _GatedCall:
    """The per-request state of one gated call (the middleware itself stays stateless)."""

    __slots__ = (
        "app_scope",
        "body",
        "cancelled_by_disconnect",
        "context",
        "disconnect_message",
        "disconnected",
        "fmt",
        "headers",
        "mw",
        "probe",
        "replayed",
        "request_id",
        "response_complete",
        "response_started",
        "route",
        "scope",
        "sent_body",
        "server_receive",
        "server_send",
        "status",
    )

    def __init__(
        self,
        middleware: GatewayMiddleware,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: WireFormat | Estimator,
    ) -> None:
        self.mw = middleware
        self.scope = scope
        self.server_receive = receive
        self.server_send = send
        self.route = route
        self.fmt = route if isinstance(route, WireFormat) else None
        self.request_id = middleware.request_id_factory()
        self.headers = _headers(scope)
        self.body = b""
        self.replayed = False
        self.context: GatewayContext | None = None
        self.response_started = False
        self.status = 0
        self.response_complete = False
        self.sent_body = False
        # Created when the app first waits for a second receive() (rare: most never do).
        self.disconnected: asyncio.Future[None] | None = None
        self.disconnect_message: Message | None = None
        self.cancelled_by_disconnect = False
        self.app_scope = _scope_type()()
        self.probe: RequestProbe | None = None

    async def run_observed(self, instruments: Instruments) -> None:
        """``run`` with metrics and tracing told what happens (see gatewaykit.observability)."""
        path: str = self.scope["path"]
        if path not in self.mw.routes:
            path = path[len(self.scope.get("root_path", "")) :]
        self.probe = probe = instruments.start(path, self.headers)
        probe.activate()
        try:
            await self.run()
        finally:
            probe.finished(self.status)

    async def run(self) -> None:
        try:
            request = await self._read_and_parse()
        except RequestRejected as rejection:
            await self._send_error(await self._authenticate_first(rejection))
            return
        if request is None:
            return  # the client left before the body arrived: nothing was admitted
        if self.probe is not None:
            self.probe.admitting()
        try:
            if self.mw.resolve_directly:  # the mode undoes a cancelled admission itself
                context = await self.mw.mode.resolve(request)
            else:
                # Its own task, awaited through asyncio.shield: a cancellation of this
                # request (anyio's or a plain task.cancel()) between "hold written" and
                # "context returned" cannot abandon the hold: the admission finishes and
                # its settlement is closed as incomplete (_abandon). anyio's shielded
                # scope would not stop a plain task.cancel().
                admission = asyncio.ensure_future(self.mw.mode.resolve(request))
                try:
                    context = await asyncio.shield(admission)
                except asyncio.CancelledError:
                    self.mw._closing.add(admission)  # kept referenced until it is done
                    admission.add_done_callback(self.mw._closing.discard)
                    admission.add_done_callback(self.mw._abandon)
                    raise
        except RequestRejected as rejection:
            await self._send_error(rejection)
            return
        except LedgerError as exc:
            # Any store failure during admission, not only "unreachable": never a bare 500.
            logger.warning(
                "request %s refused: ledger failed (%s)", self.request_id, type(exc).__name__
            )
            await self._send_error(RequestRejected(ErrorKind.UNAVAILABLE, _UNAVAILABLE))
            return
        self.context = context
        if self.probe is not None:
            self.probe.admitted(context)
        await self._serve(context)

    # -- admission -------------------------------------------------------------------
    async def _read_and_parse(self) -> GatewayRequest | None:
        limit = self.mw.max_body_bytes
        declared = self.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.server_receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self.body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        body = parse_body(self.body)
        if isinstance(self.route, WireFormat):
            parsed = parse_request(self.route, body)
        else:
            try:
                parsed = self.route(body)
            except ValueError as exc:
                raise RequestRejected(ErrorKind.INVALID_REQUEST, str(exc)) from None
            if not isinstance(parsed, ParsedRequest):
                raise TypeError(f"estimator for {self.scope['path']} must return ParsedRequest")
        return GatewayRequest(
            request_id=self.request_id,
            path=self.scope["path"],
            format=self.fmt,
            headers=self.headers,
            body=body,
            raw_body=self.body,
            parsed=parsed,
        )

    async def _authenticate_first(self, rejection: RequestRejected) -> RequestRejected:
        """A bad credential outranks a bad body (401 > 400/413)."""
        mode = self.mw.mode
        if not isinstance(mode, SupportsAuthenticate):
            return rejection
        try:
            await mode.authenticate(self.headers)
        except RequestRejected as auth_rejection:
            return auth_rejection
        except LedgerError:
            return RequestRejected(ErrorKind.UNAVAILABLE, _UNAVAILABLE)
        return rejection

    async def _send_error(self, rejection: RequestRejected) -> None:
        fmt = self.fmt or WireFormat.OPENAI_CHAT
        payload = error_body(fmt, rejection.kind, rejection.message, rejection.details)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ]
        headers.extend(
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in rejection.headers.items()
        )
        headers.append((self.mw.request_id_header_raw, self.request_id.encode("latin-1")))
        logger.debug(
            "request %s rejected: %s %s", self.request_id, rejection.status, rejection.kind.value
        )
        self.status = rejection.status
        if self.probe is not None:
            self.probe.refused(rejection.kind)
        if self.mw.denials is not None:
            self.mw.denials.refused(rejection.kind)
        await self.server_send(
            {"type": "http.response.start", "status": rejection.status, "headers": headers}
        )
        await self.server_send({"type": "http.response.body", "body": payload})

    # -- serving ---------------------------------------------------------------------
    async def _serve(self, context: GatewayContext) -> None:
        settlement = context.settlement
        # Written into the server's scope (not a copy), as SessionMiddleware does, so what
        # the app records there (route, path params) stays visible to outer middleware.
        scope = self.scope
        scope[SCOPE_KEY] = context
        interval = self.mw.heartbeat_interval
        if interval is None:
            interval = getattr(settlement, "heartbeat_interval", None)
        # One plain task listens for the client leaving; a timer (not a task) heartbeats.
        # An anyio task group here cost a third of a request (docs/performance.md).
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(self._watch())
        beat = _Heartbeat(loop, settlement, float(interval)) if interval else None
        app_error: Exception | None = None
        try:
            try:
                with self.app_scope:
                    await self.mw.app(scope, self._receive, self._send)
            except Exception as exc:
                app_error = exc
            finally:
                if not watcher.done():
                    watcher.cancel()
                if beat is not None:
                    beat.stop()
        except BaseException:
            # Cancelled from outside (server shutdown, task cancellation): charge what
            # was consumed, shielded, and let the cancellation continue.
            await self._settle(settlement, "incomplete", None)
            raise
        if self.cancelled_by_disconnect:
            await self._settle(settlement, "incomplete", None)
        elif app_error is not None:
            await self._settle(settlement, "error", app_error)
        elif not self.response_started or self.status >= 400:
            reason = f"the app answered HTTP {self.status} without settling"
            if not self.response_started:
                reason = "the app returned without a response"
            await self._settle(settlement, "error", reason)
        else:
            await self._settle(settlement, "no_usage", None)
        if app_error is not None:
            try:
                raise app_error
            finally:  # the frame would otherwise hold its own traceback: a cycle
                del app_error

    async def _settle(
        self, settlement: Settlement, path: str, error: BaseException | str | None
    ) -> None:
        if settlement.done:
            return
        with anyio.CancelScope(shield=True):
            try:
                if path == "incomplete":
                    await settlement.on_incomplete()
                elif path == "error":
                    assert error is not None
                    await settlement.on_error(error)
                else:
                    await settlement.on_no_usage()
            except Exception:
                logger.exception("settling request %s failed", self.request_id)

    async def _receive(self) -> Message:
        if not self.replayed:
            self.replayed = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self.disconnect_message is None:
            if self.disconnected is None:
                self.disconnected = asyncio.get_running_loop().create_future()
            await asyncio.shield(self.disconnected)
        assert self.disconnect_message is not None
        return self.disconnect_message

    async def _watch(self) -> None:
        """Listen for the client leaving; cancel the app if its response is not complete."""
        message: Message = {"type": "http.disconnect"}
        try:
            while True:
                message = await self.server_receive()
                if message["type"] == "http.disconnect":
                    break
        except Exception:
            logger.debug("receive() failed for %s; treating as disconnect", self.request_id)
            message = {"type": "http.disconnect"}
        self.disconnect_message = message
        if self.disconnected is not None and not self.disconnected.done():
            self.disconnected.set_result(None)
        if not self.response_complete:
            self.cancelled_by_disconnect = True
            self.app_scope.cancel()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not message.get("more_body", False):
                self.response_complete = True
            if not self.sent_body and self.status < 400 and message.get("body"):
                self.sent_body = True
                if self.probe is not None:
                    self.probe.first_byte()
                assert self.context is not None
                if not self.context.settlement.committed:
                    await self.context.settlement.on_first_chunk()
        elif kind == "http.response.start" and not self.response_started:
            self.response_started = True
            self.status = int(message["status"])
            assert self.context is not None
            rid = self.mw.request_id_header_raw
            headers = [item for item in message.get("headers", ()) if item[0].lower() != rid]
            extra = self.context.response_headers
            if extra:
                present = {name.lower() for name, _ in headers}
                for name, value in extra.items():
                    raw = name.lower().encode("latin-1")
                    if raw not in present:
                        headers.append((raw, value.encode("latin-1")))
            headers.append((rid, self.request_id.encode("latin-1")))
            message = {**message, "headers": headers}
        elif kind == "http.response.pathsend":  # the ASGI extension ends a file response
            self.response_complete = True
        await self.server_send(message)


class _Heartbeat:
    """Extends the settlement's hold every ``interval`` seconds while the response lives.

    A loop timer, not a task: nothing runs per request until the first beat is due (a
    third of the hold TTL, minutes by default).
    """

    __slots__ = ("_handle", "_interval", "_loop", "_settlement", "_task")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, settlement: Settlement, interval: float
    ) -> None:
        self._loop = loop
        self._settlement = settlement
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self._handle: asyncio.TimerHandle | None = loop.call_later(interval, self._due)

    def _due(self) -> None:
        self._handle = self._loop.call_later(self._interval, self._due)
        if self._settlement.done or (self._task is not None and not self._task.done()):
            return
        self._task = self._loop.create_task(self._beat())

    async def _beat(self) -> None:
        try:
            await self._settlement.heartbeat()
        except Exception:
            logger.warning("heartbeat for %s failed", self._settlement.request_id, exc_info=True)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._task is not None and not self._task.done():
            self._task.cancel()


@functools.cache
def _scope_type() -> type[anyio.CancelScope]:
    """The running backend's cancel scope class (the middleware runs on asyncio only).

    ``anyio.CancelScope()`` asks sniffio which async library runs, on every call; the
    class learnt from the first request's scope is built without asking.
    """
    return type(anyio.CancelScope())


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", ()):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _too_large(limit: int) -> RequestRejected:
    return RequestRejected(
        ErrorKind.TOO_LARGE, f"the request body is larger than the gateway's limit of {limit} bytes"
    )
