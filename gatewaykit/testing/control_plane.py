"""A small fake control plane speaking the platform protocol, for tests of PlatformMode.

It implements ``POST /v1/resolve`` and ``POST /v1/usage`` exactly as
docs/platform-protocol.md specifies, keeps every call it received, and has knobs to
misbehave: fail the next N usage posts, stall them past the gateway's timeout after
recording them, answer with bodies that are not JSON, be down, refuse tokens, budgets,
rate limits, answer resolve late. It keeps what it *admitted* apart from what was
*reported*, so a test can assert the protocol's promise — exactly one report per admitted
request — with :meth:`FakeControlPlane.report_problems`. It is a Starlette app
(:attr:`FakeControlPlane.app`): call it in-process through ``httpx.ASGITransport`` or run
it on a real socket with :func:`serve_app`::

    plane = FakeControlPlane(gateway_token="gw-test")
    plane.add_user("tok-alice", user_id="alice", budget_usd=Decimal("1"))
    plane.set_attempts("gpt-4o-mini", {"provider": "openai", "base_url": "http://up/v1"})
    async with serve_app(plane.app) as base_url:
        ...
    assert plane.delivered_keys() == {...}
    assert plane.report_problems() == []      # one report per admitted request
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["Admitted", "FakeControlPlane", "FakeUser", "UsagePost", "serve_app"]

_STATUSES = ("success", "error", "incomplete", "no_usage", "released")
_SOURCES = ("provider", "partial", "estimated", "none")
_USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")


@dataclasses.dataclass(slots=True)
class FakeUser:
    """A user token the fake knows. ``budget_usd`` None is unlimited; otherwise every
    admitted request's ``estimate_usd`` is taken from it for good (``held_usd``), and a
    request is refused 402 once nothing is left. ``models`` None allows every model;
    ``retry_after`` set makes every resolve a 429 with that header."""

    user_id: str
    budget_usd: Decimal | None = None
    models: frozenset[str] | None = None
    retry_after: int | None = None
    held_usd: Decimal = Decimal(0)


@dataclasses.dataclass(frozen=True, slots=True)
class UsagePost:
    """One ``POST /v1/usage`` as received (including failed and repeated ones)."""

    idempotency_key: str | None
    body: Any
    answered: int


@dataclasses.dataclass(frozen=True, slots=True)
class Admitted:
    """A request the fake admitted (answered 200 to, or was about to)."""

    request_id: str
    user_token: str
    attempt_ids: tuple[str, ...]
    estimate_usd: Decimal


def _error(status: int, type_: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message, **extra}}, status)


class FakeControlPlane:
    """The fake. Attributes below are knobs a test may change at any time.

    ``attempts`` maps a model name (or ``"*"``) to attempt specs: mappings with
    ``provider``, ``base_url``, and optionally ``model``, ``api_key``, ``headers``,
    ``attempt_id``. A missing ``attempt_id`` is generated per request (``att_<n>``).
    A model with no entry (and no ``"*"``) resolves to 404; an empty list answers 200 with
    no attempts (a protocol violation the gateway must turn into 503).
    """

    def __init__(
        self,
        *,
        gateway_token: str = "gw-test-token",  # noqa: S107 - a test fake's default
        users: Mapping[str, FakeUser] | None = None,
        attempts: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        self.gateway_token = gateway_token
        self.users: dict[str, FakeUser] = dict(users or {})
        self.attempts: dict[str, list[dict[str, Any]]] = {
            model: [dict(spec) for spec in specs] for model, specs in (attempts or {}).items()
        }
        # -- knobs ------------------------------------------------------------------
        #: Every endpoint answers 503 while True.
        self.down = False
        #: The next N usage posts are answered 503 (with ``Retry-After: 0``) and not recorded.
        self.fail_usage_posts = 0
        #: The next N usage posts are recorded, then the answer stalls ``stall_seconds``.
        self.stall_usage_posts = 0
        self.stall_seconds = 30.0
        #: The next N usage posts are recorded and answered 200 with a body that is not JSON.
        self.malformed_usage_posts = 0
        #: The next N usage posts are answered 400 (a permanent rejection) and not recorded.
        self.reject_usage_posts = 0
        #: Force every resolve to answer this status (with a protocol error body).
        self.resolve_status: int | None = None
        #: Resolve answers 200 with a body that is not JSON while True.
        self.malformed_resolve = False
        #: Resolve waits this many seconds before doing anything (admitting included).
        self.resolve_delay = 0.0
        #: Resolve admits at once, then waits this many seconds before answering: an
        #: admission whose answer reaches the gateway after it gave up.
        self.resolve_answer_delay = 0.0
        # -- records ----------------------------------------------------------------
        self.resolve_calls: list[dict[str, Any]] = []
        self.usage_posts: list[UsagePost] = []
        #: Accepted reports by idempotency key (the first body; repeats must match it).
        self.reports: dict[str, dict[str, Any]] = {}
        #: Requests admitted, by request id.
        self.admitted: dict[str, Admitted] = {}
        #: Request ids released before they were admitted: a later resolve is refused 409.
        self.released_early: set[str] = set()
        self._ids = itertools.count(1)
        self.app = Starlette(
            routes=[
                Route("/v1/resolve", self._resolve, methods=["POST"]),
                Route("/v1/usage", self._usage, methods=["POST"]),
            ]
        )

    def __repr__(self) -> str:
        return f"<FakeControlPlane users={len(self.users)} reports={len(self.reports)}>"

    # -- configuration helpers ---------------------------------------------------------
    def add_user(
        self,
        token: str,
        *,
        user_id: str,
        budget_usd: Decimal | None = None,
        models: Sequence[str] | None = None,
        retry_after: int | None = None,
    ) -> FakeUser:
        user = FakeUser(
            user_id=user_id,
            budget_usd=budget_usd,
            models=None if models is None else frozenset(models),
            retry_after=retry_after,
        )
        self.users[token] = user
        return user

    def set_attempts(self, model: str, *specs: Mapping[str, Any]) -> None:
        """Serve ``model`` (or ``"*"``: any model) with these attempts, in order."""
        self.attempts[model] = [dict(spec) for spec in specs]

    # -- observations ------------------------------------------------------------------
    def delivered_keys(self) -> set[str]:
        return set(self.reports)

    def posts_for(self, key: str) -> list[UsagePost]:
        return [post for post in self.usage_posts if post.idempotency_key == key]

    def reports_for(self, request_id: str) -> list[dict[str, Any]]:
        """The accepted reports of one request (the protocol allows exactly one)."""
        return [body for body in self.reports.values() if body["request_id"] == request_id]

    def unreported(self) -> set[str]:
        """Admitted requests the gateway has not reported (yet)."""
        reported = {body["request_id"] for body in self.reports.values()}
        return set(self.admitted) - reported

    def report_problems(self) -> list[str]:
        """Every way the accepted reports break "exactly one report per admitted request";
        empty when they keep it. A release of a request never admitted is allowed (it is a
        no-op); any other report of a request never admitted is not."""
        problems = []
        by_request: dict[str, list[dict[str, Any]]] = {}
        for body in self.reports.values():
            by_request.setdefault(body["request_id"], []).append(body)
        for request_id in sorted(set(self.admitted) | set(by_request)):
            bodies = by_request.get(request_id, [])
            statuses = sorted(body["status"] for body in bodies)
            if request_id not in self.admitted:
                if statuses != ["released"]:
                    problems.append(f"{request_id}: reported {statuses} but never admitted")
            elif len(bodies) != 1:
                problems.append(f"{request_id}: admitted, {len(bodies)} reports {statuses}")
        return problems

    # -- endpoints ---------------------------------------------------------------------
    def _gateway_ok(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.gateway_token}"

    async def _resolve(self, request: Request) -> Response:
        raw = await request.body()  # read first: a gateway that gives up does not stop us
        if self.resolve_delay:
            await anyio.sleep(self.resolve_delay)
        if self.down:
            return _error(503, "unavailable", "control plane is down")
        if not self._gateway_ok(request):
            return _error(401, "invalid_gateway_token", "unknown gateway token")
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "invalid_request", "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_request", "body must be a JSON object")
        self.resolve_calls.append(body)
        if self.resolve_status is not None:
            return _error(self.resolve_status, "forced", f"forced status {self.resolve_status}")
        if self.malformed_resolve:
            return Response(b"<html>not json", 200, media_type="application/json")
        missing = [f for f in ("request_id", "user_token", "model", "endpoint") if f not in body]
        if missing or "estimate_usd" not in body:
            return _error(400, "invalid_request", f"missing fields: {missing or ['estimate_usd']}")
        try:
            estimate = Decimal(str(body["estimate_usd"]))
        except InvalidOperation:
            return _error(400, "invalid_request", "estimate_usd is not a decimal string")
        user = self.users.get(str(body["user_token"]))
        if user is None:
            return _error(401, "authentication_error", "unknown API key")
        model = str(body["model"])
        if user.models is not None and model not in user.models:
            return _error(403, "permission_error", f"this key may not use {model}")
        if user.retry_after is not None:
            return JSONResponse(
                {"error": {"type": "rate_limit_error", "message": "slow down"}},
                429,
                headers={"Retry-After": str(user.retry_after)},
            )
        specs = self.attempts.get(model, self.attempts.get("*"))
        if specs is None:
            return _error(404, "not_found_error", f"model {model} is not served")
        request_id = str(body["request_id"])
        if request_id in self.released_early:
            # The gateway gave up on this resolve and already released it: never admit it.
            return _error(409, "released", f"request {request_id} was released by the gateway")
        if user.budget_usd is not None:
            remaining = user.budget_usd - user.held_usd
            if remaining <= 0 or estimate > remaining:
                return _error(
                    402,
                    "billing_error",
                    f"budget of {user.user_id} exhausted",
                    scope=f"user:{user.user_id}",
                    remaining=str(max(remaining, Decimal(0))),
                )
            user.held_usd += estimate
        attempts = []
        for spec in specs:
            attempt = {"attempt_id": f"att_{next(self._ids)}", "model": model, **spec}
            attempts.append(attempt)
        self.admitted[request_id] = Admitted(
            request_id=request_id,
            user_token=str(body["user_token"]),
            attempt_ids=tuple(str(a["attempt_id"]) for a in attempts),
            estimate_usd=estimate,
        )
        if self.resolve_answer_delay:
            await anyio.sleep(self.resolve_answer_delay)
        return JSONResponse(
            {"request_id": body["request_id"], "user_id": user.user_id, "attempts": attempts}
        )

    async def _usage(self, request: Request) -> Response:
        key = request.headers.get("idempotency-key")
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None

        def answer(status: int) -> None:
            self.usage_posts.append(UsagePost(key, body, status))

        if self.down:
            answer(503)
            return _error(503, "unavailable", "control plane is down")
        if not self._gateway_ok(request):
            answer(401)
            return _error(401, "invalid_gateway_token", "unknown gateway token")
        if self.fail_usage_posts > 0:
            self.fail_usage_posts -= 1
            answer(503)
            return JSONResponse(
                {"error": {"type": "unavailable", "message": "try again"}},
                503,
                headers={"Retry-After": "0"},
            )
        if self.reject_usage_posts > 0:
            self.reject_usage_posts -= 1
            answer(400)
            return _error(400, "invalid_request", "rejected by the test")
        problem = _check_report(key, body)
        if problem is not None:
            answer(400)
            return _error(400, "invalid_request", problem)
        assert key is not None
        previous = self.reports.get(key)
        if previous is not None and previous != body:
            answer(422)
            return _error(422, "idempotency_conflict", "key reused with a different report")
        if previous is None:
            self.reports[key] = body
            if body["status"] == "released":
                self._release(str(body["request_id"]))
        if self.stall_usage_posts > 0:
            self.stall_usage_posts -= 1
            answer(200)
            await anyio.sleep(self.stall_seconds)
            return JSONResponse({"status": "accepted"})
        if self.malformed_usage_posts > 0:
            self.malformed_usage_posts -= 1
            answer(200)
            return Response(b"{not json", 200, media_type="application/json")
        status = 200 if previous is not None else 202
        answer(status)
        return JSONResponse({"status": "accepted", "duplicate": previous is not None}, status)

    def _release(self, request_id: str) -> None:
        """Nothing is charged for a released request: its estimate goes back to the user.
        A release of a request not (yet) admitted is remembered, so it never will be."""
        admitted = self.admitted.get(request_id)
        if admitted is None:
            self.released_early.add(request_id)
            return
        user = self.users.get(admitted.user_token)
        if user is not None and user.budget_usd is not None:
            user.held_usd -= admitted.estimate_usd


def _check_report(key: str | None, body: Any) -> str | None:
    """What is wrong with a usage report under the protocol, or None."""
    if not key:
        return "missing Idempotency-Key header"
    if not isinstance(body, dict):
        return "body must be a JSON object"
    for field in ("request_id", "attempt_id", "status", "usage", "usage_source"):
        if field not in body:
            return f"missing field {field}"
    if key != f"{body['request_id']}:{body['attempt_id']}":
        return "Idempotency-Key must be <request_id>:<attempt_id>"
    if body["status"] not in _STATUSES:
        return f"status must be one of {_STATUSES}"
    if body["usage_source"] not in _SOURCES:
        return f"usage_source must be one of {_SOURCES}"
    usage = body["usage"]
    if body["status"] == "released" and usage is not None:
        return "a released report carries no usage"
    if usage is None:
        return None if body["usage_source"] == "none" else "usage null needs usage_source none"
    if not isinstance(usage, dict):
        return "usage must be an object or null"
    for field in _USAGE_FIELDS:
        value = usage.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"usage.{field} must be a non-negative integer"
    return None


@contextlib.asynccontextmanager
async def serve_app(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    graceful_shutdown: float = 0.5,
) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a real socket; yields its base URL (``http://host:port``).

    ``port=0`` picks a free port. Leaving the block stops the server (in-flight requests
    get ``graceful_shutdown`` seconds); entering again with the same port brings it back.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        # Leave the test runner's signal handlers alone.
        def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
            return contextlib.nullcontext()

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        bound_port = sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            # Longer than a gateway client keeps idle connections (30 s), as a real
            # control plane's: uvicorn's 5 s would race the client's reuse of them.
            timeout_keep_alive=75,
            # uvicorn types this int, but any number of seconds works (asyncio.wait_for).
            timeout_graceful_shutdown=cast(Any, graceful_shutdown),
        )
        server = _Server(config)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_serve, server, sock)
            with anyio.fail_after(10):  # uvicorn exposes no start event; poll its flag
                for _ in itertools.count():
                    if server.started:
                        break
                    await anyio.sleep(0.005)
            try:
                yield f"http://{host}:{bound_port}"
            finally:
                server.should_exit = True
    finally:
        sock.close()


async def _serve(server: Any, sock: socket.socket) -> None:
    await server.serve(sockets=[sock])
