"""``/livez`` and ``/readyz``: a small ASGI app for load balancers and orchestrators.

``/livez`` answers 200 while the process serves. ``/readyz`` answers 200 when every store
the gateway needs answers a cheap query within ``timeout`` seconds — the ledger (a budget
lookup, through the same path a request takes) and, in platform mode, the usage outbox,
which must also not be stuck (its oldest unacknowledged report younger than
``outbox_stuck_after``). Otherwise 503 with a JSON reason. Mount it at the root of a
separate port, or anywhere in the host app.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import Ledger
from gatewaykit.observability.asgi import JSON, Receive, Scope, Send, serve_get
from gatewaykit.outbox.base import Outbox

__all__ = ["HealthApp"]

#: A budget scope no one creates: looking it up is an indexed read that finds nothing.
_PROBE_SCOPE = "gatewaykit:readyz"


class HealthApp:
    """Serves ``/livez`` and ``/readyz`` (any other path: 404); see the module docstring."""

    def __init__(
        self,
        *,
        ledger: Ledger | None = None,
        outbox: Outbox | None = None,
        timeout: float = 2.0,
        outbox_stuck_after: float | None = 600.0,
    ) -> None:
        if not timeout > 0:
            raise ConfigurationError("timeout must be a positive number of seconds")
        if outbox_stuck_after is not None and not outbox_stuck_after > 0:
            raise ConfigurationError("outbox_stuck_after must be a positive number or None")
        self.ledger = ledger
        self.outbox = outbox
        self.timeout = timeout
        self.outbox_stuck_after = outbox_stuck_after

    def __repr__(self) -> str:
        checks = [name for name in ("ledger", "outbox") if getattr(self, name) is not None]
        return f"<HealthApp checks={checks} timeout={self.timeout}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_get(scope, receive, send, self._respond)

    async def _respond(self, path: str, headers: dict[str, str]) -> tuple[int, str, bytes]:
        if path.endswith("/livez"):
            return 200, JSON, b'{"status":"ok"}'
        if not path.endswith("/readyz"):
            return 404, JSON, b'{"status":"not_found"}'
        checks = await self.readiness()
        ready = all(result == "ok" for result in checks.values())
        body: dict[str, Any] = {"status": "ok" if ready else "unavailable", "checks": checks}
        if not ready:
            body["reason"] = "; ".join(
                f"{name}: {result}" for name, result in checks.items() if result != "ok"
            )
        return (200 if ready else 503), JSON, json.dumps(body).encode()

    async def readiness(self) -> dict[str, str]:
        """Each check's result: ``"ok"`` or why not (an exception's class, never its text,
        which may name a host or a credential)."""
        checks: dict[str, str] = {}
        if self.ledger is not None:
            checks["ledger"] = await self._check(self._ledger_ready)
        if self.outbox is not None:
            checks["outbox"] = await self._check(self._outbox_ready)
        return checks

    async def _check(self, probe: Callable[[], Awaitable[str]]) -> str:
        try:
            with anyio.fail_after(self.timeout):
                return await probe()
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except Exception as exc:
            return f"failed ({type(exc).__name__})"

    async def _ledger_ready(self) -> str:
        assert self.ledger is not None
        await self.ledger.status(_PROBE_SCOPE)
        return "ok"

    async def _outbox_ready(self) -> str:
        assert self.outbox is not None
        age = await self.outbox.oldest_age()
        limit = self.outbox_stuck_after
        if limit is not None and age is not None and age > limit:
            return f"stuck: the oldest usage report has waited {age:.0f} s (limit {limit:g} s)"
        return "ok"
