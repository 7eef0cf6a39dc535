"""kill -9 a gateway between the provider's answer and the settle's commit: the client must
not hold an answer the reopened ledger does not charge (issue 19).

A real gateway process (uvicorn, the adapters, StandaloneMode, a SQLite ledger file) whose
ledger never finishes a settle, in front of the fake provider answering at once. Raw
socket clients send a non-streaming request on each of the three routes and one chat
stream; once every settle is pending the process gets SIGKILL. Whatever each client
received by then is checked against the reopened ledger: a complete answer (its whole
Content-Length, or a stream's final event) would have to be charged there. It is not
(the settle never committed), so no client may hold one — the holds are still live, left
for the sweeper.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gatewaykit.ledger.base import HoldState
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.testing import FakeBehavior, FakeProvider
from tests.adapters.conftest import serve
from tests.processes import child_process
from tests.scenarios.conftest import new_key
from tests.scenarios.test_upstream import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def gateway_process(
    port: int, db_path: Path, provider_url: str, marker: Path, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return child_process(
        "tests.scenarios._slow_settle_child",
        [str(port), str(db_path), provider_url, str(marker)],
        log,
    )


async def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, read(log)
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/healthz")).status_code == 200:
                    return
            await anyio.sleep(0.05)
    raise AssertionError("the gateway did not start")


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def pending_settles(marker: Path) -> list[str]:
    """The hold ids whose settle the gateway began (and never finished)."""
    return read(marker).split()


def raw_request(path: str, key: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def complete_answer(raw: bytes, stream: bool) -> bool:
    """Whether ``raw`` (all a client received) holds a complete answer."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    if stream:
        return b"[DONE]" in body
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


MESSAGES = [{"role": "user", "content": "hello there"}]
REQUESTS: list[tuple[str, dict[str, Any], bool]] = [
    ("/v1/chat/completions", {"model": "test-model", "messages": MESSAGES}, False),
    ("/v1/messages", {"model": "test-model", "messages": MESSAGES, "max_tokens": 50}, False),
    ("/v1/responses", {"model": "test-model", "input": "hello there"}, False),
    ("/v1/chat/completions", {"model": "test-model", "messages": MESSAGES, "stream": True}, True),
]


async def test_kill_9_while_settles_are_pending_leaves_no_uncharged_answer(
    tmp_path: Path,
) -> None:
    db_path, marker, log = tmp_path / "ledger.db", tmp_path / "settles", tmp_path / "gw.log"
    async with SQLiteLedger(str(db_path)) as ledger:
        await ledger.set_budget("user:alice", limit=Decimal(1))
        key, _ = await new_key(ledger)
    provider = FakeProvider(behavior=FakeBehavior(events=3, input_tokens=20))
    port = free_port()
    received: list[bytes] = []
    async with serve(provider) as provider_url:
        with gateway_process(port, db_path, provider_url, marker, log) as gateway:
            await wait_ready(f"http://127.0.0.1:{port}", gateway, log)
            clients = []
            for path, payload, _ in REQUESTS:
                connection = await anyio.connect_tcp("127.0.0.1", port)
                await connection.send(raw_request(path, key, payload))
                clients.append(connection)
            with anyio.fail_after(10):  # every request reached its settle
                while len(pending_settles(marker)) < len(REQUESTS):
                    assert gateway.poll() is None, read(log)
                    await anyio.sleep(0.02)
            os.kill(gateway.pid, signal.SIGKILL)
            gateway.wait(timeout=10)
        assert len(provider.requests) == len(REQUESTS)  # each was answered upstream
        for connection in clients:
            data = b""
            with (
                anyio.fail_after(5),
                contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError),
            ):
                while True:
                    data += await connection.receive()
            await connection.aclose()
            received.append(data)
    pending = pending_settles(marker)
    async with SQLiteLedger(str(db_path)) as ledger:
        live = {hold.hold_id: hold for hold in await ledger.holds()}
        charged = {record.request_id for record in await ledger.usage()}
        assert await ledger.check() == []
    assert charged == set()  # no settle committed ...
    assert set(live) == set(pending)  # ... each hold is live, for the sweeper to expire
    assert all(hold.state is HoldState.HELD for hold in live.values())
    for (path, _, streams), data in zip(REQUESTS, received, strict=True):
        # No client holds an answer the ledger does not charge.
        assert not complete_answer(data, streams), (path, data[:300])
        if streams:
            assert b"tok0" in data  # the stream itself went out as it came
        else:
            assert data == b""  # a body is the answer: nothing of it before its charge
