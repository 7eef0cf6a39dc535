"""A raw ASGI driver for streaming and disconnect tests (httpx's ASGITransport buffers).

``receive`` is scripted: the request body (in one or several chunks), then it blocks until
a disconnect is due and returns ``http.disconnect``. A disconnect is due when the
``disconnect`` predicate returns true for the messages sent so far, when the test calls
``exchange.disconnect()``, or (like uvicorn) once the response is complete. Every message
the app sends is recorded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import anyio
from starlette.types import ASGIApp, Message

__all__ = ["Exchange", "call", "http_scope"]


def http_scope(
    path: str, *, method: str = "POST", headers: Mapping[str, str] | None = None
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 12345),
        "server": ("testserver", 80),
        "state": {},
    }


@dataclasses.dataclass
class Exchange:
    sent: list[Message] = dataclasses.field(default_factory=list)
    error: BaseException | None = None
    receive_calls: int = 0
    disconnect_event: anyio.Event = dataclasses.field(default_factory=anyio.Event)

    def disconnect(self) -> None:
        self.disconnect_event.set()

    @property
    def start(self) -> Message:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected one response start, got {len(starts)}"
        return starts[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def headers(self) -> dict[str, str]:
        return {k.decode().lower(): v.decode() for k, v in self.start["headers"]}

    @property
    def chunks(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.sent if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def complete(self) -> bool:
        bodies = [m for m in self.sent if m["type"] == "http.response.body"]
        return bool(bodies) and not bodies[-1].get("more_body", False)


async def call(
    app: ASGIApp,
    path: str = "/v1/chat/completions",
    *,
    json_body: Any = None,
    body: bytes | Sequence[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
    method: str = "POST",
    disconnect: Callable[[list[Message]], bool] | None = None,
    disconnect_during_body: bool = False,
    raise_app_exceptions: bool = True,
    deadline: float = 5.0,
    exchange: Exchange | None = None,
) -> Exchange:
    """Run one request through ``app``; see the module docstring."""
    if json_body is not None:
        body = json.dumps(json_body).encode()
    chunks = [body] if isinstance(body, bytes) else list(body or [b""])
    script: list[Message] = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    if disconnect_during_body:
        script = [{**script[0], "more_body": True}, {"type": "http.disconnect"}]
    ex = exchange or Exchange()
    all_headers = {"content-type": "application/json", **(headers or {})}

    async def receive() -> Message:
        ex.receive_calls += 1
        if script:
            return script.pop(0)
        await ex.disconnect_event.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        ex.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            ex.disconnect_event.set()
        if disconnect is not None and disconnect(ex.sent):
            ex.disconnect_event.set()
        await anyio.lowlevel.checkpoint()

    with anyio.fail_after(deadline):
        try:
            await app(http_scope(path, method=method, headers=all_headers), receive, send)
        except Exception as exc:
            if raise_app_exceptions:
                raise
            ex.error = exc
    return ex
