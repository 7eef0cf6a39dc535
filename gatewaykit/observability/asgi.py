"""The few lines of ASGI the metrics and health apps share (no framework needed)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.types import Receive, Scope, Send

__all__ = ["JSON", "Receive", "Responder", "Scope", "Send", "serve_get"]

#: ``respond(path, headers)`` → status, content type, body.
Responder = Callable[[str, dict[str, str]], Awaitable[tuple[int, str, bytes]]]
JSON = "application/json"


async def serve_get(scope: Scope, receive: Receive, send: Send, respond: Responder) -> None:
    """Serve GET/HEAD with ``respond(path, headers)``; answer lifespan, refuse the rest."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["method"] not in ("GET", "HEAD"):
        status, content_type, body = 405, JSON, b'{"status":"method_not_allowed"}'
    else:
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", ())
        }
        status, content_type, body = await respond(scope["path"], headers)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
