"""The admin page's locks: master-key login, the signed session cookie, CSRF tokens.

* The session is one cookie, signed with itsdangerous and stamped with its issue time:
  ``{"n": nonce, "a": authenticated}``. It is HttpOnly, SameSite=Strict, scoped to the
  admin's path (and Secure over https), and refused once older than the session lifetime.
  No server-side store: any process holding the same signing secret accepts it.
* Every visitor gets a session before logging in (so the login form has a CSRF token
  too); a successful login issues a fresh nonce, so a planted cookie cannot be promoted.
* A form's CSRF token is an HMAC of the session's nonce; a POST without the matching
  token is refused whatever its cookie says.
* The master key is compared as SHA-256 digests with ``hmac.compare_digest``. Failed
  attempts are answered with one generic message after a delay, and counted per client
  address: past ``max_failures`` in ``failure_window`` seconds the login answers 429.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

__all__ = ["COOKIE", "LoginThrottle", "Session", "SessionSigner"]

COOKIE = "gatewaykit_admin"


@dataclass(frozen=True, slots=True)
class Session:
    nonce: str
    authenticated: bool = False

    @classmethod
    def fresh(cls, *, authenticated: bool = False) -> Session:
        return cls(secrets.token_urlsafe(24), authenticated)


class SessionSigner:
    """Signs sessions into cookie values, checks them, and derives their CSRF tokens."""

    def __init__(self, secret: bytes, *, max_age: float) -> None:
        self._serializer = URLSafeTimedSerializer(secret, salt="gatewaykit.admin.session")
        self._csrf_key = hmac.new(secret, b"gatewaykit.admin.csrf", hashlib.sha256).digest()
        self.max_age = max_age

    def dumps(self, session: Session) -> str:
        return self._serializer.dumps({"n": session.nonce, "a": session.authenticated})

    def loads(self, value: str | None) -> Session | None:
        """The session in a cookie value; None when absent, forged, malformed or expired."""
        if not value:
            return None
        try:
            data = self._serializer.loads(value, max_age=int(self.max_age))
        except BadSignature:  # also SignatureExpired
            return None
        if not isinstance(data, dict):
            return None
        nonce, authenticated = data.get("n"), data.get("a")
        if not isinstance(nonce, str) or not isinstance(authenticated, bool):
            return None
        return Session(nonce, authenticated)

    def csrf_token(self, session: Session) -> str:
        return hmac.new(self._csrf_key, session.nonce.encode(), hashlib.sha256).hexdigest()

    def form_key_id(self, form_id: str) -> str:
        """The key id a create form's one-time id stands for: a resent form finds its key."""
        return hmac.new(self._csrf_key, b"key:" + form_id.encode(), hashlib.sha256).hexdigest()[:12]

    def csrf_ok(self, session: Session, token: object) -> bool:
        return isinstance(token, str) and hmac.compare_digest(
            self.csrf_token(session).encode(), token.encode()
        )


class LoginThrottle:
    """Failed logins per client address in a sliding window (in this process's memory)."""

    def __init__(
        self,
        *,
        max_failures: int,
        window: float,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may try now."""
        recent = self._recent(client)
        if len(recent) < self.max_failures:
            return 0.0
        return max(recent[0] + self.window - self.clock(), 0.001)

    def attempt(self, client: str) -> None:
        """Count an attempt before the key is compared (so parallel guesses count too)."""
        if client not in self._failures and len(self._failures) >= self._max_clients:
            self._prune()
        self._failures.setdefault(client, deque()).append(self.clock())

    def succeeded(self, client: str) -> None:
        """A right key: forget the attempt just counted."""
        recent = self._failures.get(client)
        if recent:
            recent.pop()

    def _recent(self, client: str) -> deque[float]:
        recent = self._failures.get(client, deque())
        horizon = self.clock() - self.window
        while recent and recent[0] <= horizon:
            recent.popleft()
        return recent

    def _prune(self) -> None:
        for client in list(self._failures):
            if not self._recent(client):
                del self._failures[client]
        if len(self._failures) >= self._max_clients:  # still full: forget the oldest
            oldest = min(self._failures, key=lambda c: self._failures[c][-1])
            del self._failures[oldest]
