"""kill -9 a gateway with streams in flight: every request the control plane admitted still
gets exactly one report, once the gateway is back.

A real gateway process (uvicorn, the adapters, PlatformMode, a SQLite file or a PostgreSQL
table as outbox) in front of the fake provider streaming slowly, answering to the fake
control plane. Three requests finish; five streams are in flight when the process gets
SIGKILL. Restarted on the same outbox, the new process finds the dead one's open
admissions once its heart-beat is older than the lease and reports them ``incomplete``;
the finished ones are reported once, as they were, and nothing else.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from gatewaykit.testing import FakeBehavior, FakeControlPlane, FakeProvider, serve_app
from tests.processes import child_process

from ._gateway_child import GATEWAY_TOKEN
from .conftest import POSTGRES_DSN, until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

LEASE = 1.0  # seconds without a heart-beat before a process counts as dead
STREAMS = 5
FINISHED = 3
BEARER = {"authorization": "Bearer tok-alice"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_process(
    port: int, plane_url: str, outbox_url: str, table: str, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return child_process(
        "tests.platform._gateway_child", [str(port), plane_url, outbox_url, table, str(LEASE)], log
    )


async def wait_ready(http: httpx.AsyncClient, url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the gateway exited with {process.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get(f"{url}/healthz")).status_code == 200:
                return
        await anyio.sleep(0.1)
    raise AssertionError("the gateway did not start")


def chat(model: str, *, stream: bool) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_streams_in_flight_at_kill_9_are_reported_incomplete_after_restart(
    tmp_path: Path, backend: str
) -> None:
    table = f"gk_crash_{uuid.uuid4().hex[:12]}"
    outbox_url = f"sqlite:///{tmp_path}/outbox.db" if backend == "sqlite" else POSTGRES_DSN
    try:
        await run(outbox_url, table, tmp_path / "gateway.log")
    finally:
        if backend == "postgres":
            import asyncpg

            conn = await asyncpg.connect(POSTGRES_DSN)
            try:
                for suffix in ("", "_admissions", "_instances"):
                    await conn.execute(f"DROP TABLE IF EXISTS {table}{suffix}")
            finally:
                await conn.close()


async def run(outbox_url: str, table: str, log: Path) -> None:
    plane = FakeControlPlane(gateway_token=GATEWAY_TOKEN)
    plane.add_user("tok-alice", user_id="alice")
    # "slow" streams for a minute; anything else answers at once.
    provider = FakeProvider(behaviors={"slow": FakeBehavior(events=600, delay=0.1)})
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    async with (
        serve_app(provider) as provider_url,
        serve_app(plane.app) as plane_url,
        httpx.AsyncClient(timeout=30) as http,
    ):
        plane.set_attempts("*", {"provider": "openai", "base_url": f"{provider_url}/v1"})
        finished: list[str] = []
        in_flight: list[str] = []
        readers: list[AsyncIterator[bytes]] = []
        with gateway_process(port, plane_url, outbox_url, table, log) as first:
            await wait_ready(http, url, first)
            for _ in range(FINISHED):
                response = await http.post(
                    f"{url}/v1/chat/completions", json=chat("fast", stream=True), headers=BEARER
                )
                assert response.status_code == 200, response.text
                finished.append(response.headers["x-request-id"])
            async with contextlib.AsyncExitStack() as streams:
                for _ in range(STREAMS):
                    response = await streams.enter_async_context(
                        http.stream(
                            "POST",
                            f"{url}/v1/chat/completions",
                            json=chat("slow", stream=True),
                            headers=BEARER,
                        )
                    )
                    assert response.status_code == 200
                    in_flight.append(response.headers["x-request-id"])
                    # Kept referenced: a dropped iterator would close the stream.
                    readers.append(response.aiter_raw())
                    first_event = await readers[-1].__anext__()
                    assert first_event.startswith(b"data: ")  # streaming from upstream
                first.send_signal(signal.SIGKILL)
                assert first.wait(timeout=10) == -signal.SIGKILL
        assert set(plane.admitted) == set(finished + in_flight)
        assert set(in_flight) <= plane.unreported()  # the dead process reported none of them

        with gateway_process(port, plane_url, outbox_url, table, log) as second:
            await wait_ready(http, url, second)
            await until(lambda: not plane.unreported(), within=30)
            await anyio.sleep(2 * LEASE)  # a while longer: nothing else arrives
            second.send_signal(signal.SIGINT)  # a clean stop this time
            assert second.wait(timeout=15) == 0

    assert plane.report_problems() == []
    assert len(plane.reports) == FINISHED + STREAMS
    for request_id in finished:
        [report] = plane.reports_for(request_id)
        assert report["status"] == "success"
    for request_id in in_flight:
        [report] = plane.reports_for(request_id)
        assert report["status"] == "incomplete"
        assert report["usage"] is None
        assert report["usage_source"] == "none"
        assert report["error"].startswith("gateway restarted:")
        assert report["attempt_id"] == plane.admitted[request_id].attempt_ids[0]
    assert "Traceback" not in await anyio.Path(log).read_text()
