"""``admin_app``: the admin page as a Starlette app, and the guard every page goes through."""

from __future__ import annotations

import hashlib
import hmac
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import jinja2
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gatewaykit.admin import formatting
from gatewaykit.admin.security import COOKIE, LoginThrottle, Session, SessionSigner
from gatewaykit.errors import ConfigurationError, LedgerError
from gatewaykit.ledger.base import Ledger

__all__ = ["Admin", "Authorize", "admin_app"]

HERE = Path(__file__).parent

#: The host's own login check: given the request, may it see the admin page?
Authorize = Callable[[Request], "bool | Awaitable[bool]"]

# Nothing is loaded from elsewhere, no inline script or style runs, no page can frame it.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),  # a created key's page must not be kept anywhere
]


class _SecurityHeaders:
    """Pure ASGI: adds :data:`SECURITY_HEADERS` to every response of the admin app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS}
                headers = [h for h in message.get("headers", []) if h[0] not in names]
                message = {**message, "headers": [*headers, *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@dataclass
class Visit:
    """One request as a page sees it: its session, and the form when it was a POST."""

    request: Request
    session: Session
    form: FormData | None = None


Handler = Callable[["Admin", Visit], Awaitable[Response]]


class Admin:
    """The admin app's state: the ledger, the locks, the templates."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        master_key: str | None,
        authorize: Authorize | None,
        secret_key: str | bytes | None,
        session_ttl: float,
        failure_delay: float,
        max_failures: int,
        failure_window: float,
    ) -> None:
        if master_key is None and authorize is None:
            raise ConfigurationError(
                "admin_app needs master_key=... or authorize=... (the host's own login check)"
            )
        if master_key is not None and len(master_key) < 16:
            raise ConfigurationError("master_key must be at least 16 characters")
        if session_ttl < 1 or failure_delay < 0 or max_failures < 1 or failure_window <= 0:
            raise ConfigurationError(
                "session_ttl must be at least 1 s, failure_window positive, failure_delay "
                "not negative and max_failures at least 1"
            )
        if secret_key is None and master_key is None:
            raise ConfigurationError("without master_key, admin_app needs secret_key=...")
        if isinstance(secret_key, str):
            secret_key = secret_key.encode()
        if secret_key is not None and len(secret_key) < 16:
            raise ConfigurationError("secret_key must be at least 16 bytes")
        self.ledger = ledger
        # Only a digest is kept: the key itself is in no attribute, repr or traceback.
        self._master_digest = (
            None if master_key is None else hashlib.sha256(master_key.encode()).digest()
        )
        self.authorize = authorize
        # Derived from the master key by default: every process of one deployment accepts
        # the same sessions, and changing the master key ends them all.
        secret = (
            secret_key
            or hmac.new(
                self._master_digest or b"", b"gatewaykit.admin.secret", hashlib.sha256
            ).digest()
        )
        self.signer = SessionSigner(secret, max_age=session_ttl)
        self.throttle = LoginThrottle(max_failures=max_failures, window=failure_window)
        self.failure_delay = failure_delay
        environment = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        environment.filters.update(formatting.FILTERS)
        self.templates = Jinja2Templates(env=environment)

    def __repr__(self) -> str:
        key = "set" if self._master_digest else "unset"
        return f"Admin(ledger={type(self.ledger).__name__}, master_key={key})"

    @property
    def needs_login(self) -> bool:
        return self._master_digest is not None

    def master_key_matches(self, presented: str) -> bool:
        """Constant time: SHA-256 digests of equal length are compared."""
        digest = hashlib.sha256(presented.encode()).digest()
        return self._master_digest is not None and hmac.compare_digest(self._master_digest, digest)

    # -- responses ---------------------------------------------------------------------

    def render(
        self, visit: Visit, template: str, status_code: int = 200, **context: Any
    ) -> Response:
        root = visit.request.scope.get("root_path", "").rstrip("/")
        return self.templates.TemplateResponse(
            visit.request,
            template,
            {
                "root": root,
                "csrf": self.signer.csrf_token(visit.session),
                "logged_in": visit.session.authenticated or not self.needs_login,
                "can_log_out": self.needs_login,
                **context,
            },
            status_code=status_code,
        )

    def redirect(self, request: Request, path: str) -> RedirectResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return RedirectResponse(root + path, status_code=303)

    def set_session(self, request: Request, response: Response, session: Session) -> None:
        root = request.scope.get("root_path", "").rstrip("/")
        response.set_cookie(
            COOKIE,
            self.signer.dumps(session),
            max_age=int(self.signer.max_age),
            path=root + "/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )

    # -- the guard -----------------------------------------------------------------------

    def page(self, handler: Handler, *, public: bool = False) -> Callable[[Request], Any]:
        """Wrap a page: session, the host's check, login, CSRF on POST, ledger errors."""

        async def endpoint(request: Request) -> Response:
            if self.authorize is not None:
                allowed = self.authorize(request)
                if inspect.isawaitable(allowed):
                    allowed = await allowed
                if not allowed:
                    return Response("Forbidden", status_code=403, media_type="text/plain")
            found = self.signer.loads(request.cookies.get(COOKIE))
            session = found or Session.fresh()
            visit = Visit(request, session)
            if not public and self.needs_login and not session.authenticated:
                response: Response = self.redirect(request, "/login")
            elif request.method == "POST" and not await self._csrf_passes(visit):
                response = self.render(
                    visit,
                    "error.html",
                    403,
                    title="Form expired",
                    message="This form expired or did not come from this page. "
                    "Go back, reload the page and try again.",
                )
            else:
                try:
                    response = await handler(self, visit)
                except LedgerError as exc:
                    response = self.render(
                        visit,
                        "error.html",
                        503,
                        title="Ledger unavailable",
                        message=f"The ledger could not answer: {type(exc).__name__}. "
                        "Try again in a moment.",
                    )
            # A stranger's session is issued with a page (its forms need the CSRF token),
            # never with a redirect: another site cannot overwrite an operator's cookie.
            changed = visit.session is not session
            if changed or (found is None and not 300 <= response.status_code < 400):
                self.set_session(request, response, visit.session)
            return response

        return endpoint

    async def _csrf_passes(self, visit: Visit) -> bool:
        try:
            visit.form = await visit.request.form(max_files=0, max_fields=50)
        except HTTPException:  # a malformed multipart body (or too many fields)
            return False
        return self.signer.csrf_ok(visit.session, visit.form.get("csrf"))

    async def fail_slowly(self) -> None:
        """The delay every wrong master key waits before its generic answer."""
        await anyio.sleep(self.failure_delay)


def admin_app(
    ledger: Ledger,
    *,
    master_key: str | None = None,
    authorize: Authorize | None = None,
    secret_key: str | bytes | None = None,
    session_ttl: float = 8 * 3600,
    failure_delay: float = 1.0,
    max_failures: int = 5,
    failure_window: float = 300.0,
) -> Starlette:
    """The admin page for ``ledger``, to mount: ``app.mount("/admin", admin_app(...))``.

    ``master_key`` (at least 16 characters) is what an operator types to log in; it opens
    a session of ``session_ttl`` seconds. ``authorize`` is the host's own check, called
    with each request (sync or async): with it alone the host's login replaces the master
    key, with both both are needed. ``secret_key`` signs the session cookie (by default it
    is derived from the master key). A wrong key waits ``failure_delay`` seconds; more
    than ``max_failures`` in ``failure_window`` seconds from one address are refused.

    The ledger is the host's: open it in the host's lifespan, as for the middleware.
    """
    from gatewaykit.admin import pages

    admin = Admin(
        ledger,
        master_key=master_key,
        authorize=authorize,
        secret_key=secret_key,
        session_ttl=session_ttl,
        failure_delay=failure_delay,
        max_failures=max_failures,
        failure_window=failure_window,
    )
    app = Starlette(
        routes=[
            *pages.routes(admin),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(_SecurityHeaders)],
    )
    app.state.admin = admin
    return app
