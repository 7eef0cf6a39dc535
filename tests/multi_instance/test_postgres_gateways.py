"""Three gateway processes share one PostgreSQL budget; one of them is killed mid-stream.

The example app (``examples/app.py``) runs three times under uvicorn, each on its own
port, all with ``--db postgresql://…?schema=<fresh schema>`` and a short hold TTL, in
front of one fake provider process that streams slowly. A load client fires 300
concurrent streamed requests across the instances against a budget with room for
exactly ``K`` of them. Then one instance gets SIGKILL while its streams are open.

Checked: exactly ``K`` admitted (the rest 402), the dead instance's holds expire after
the TTL and a sweep releases them, ``check()`` passes, nothing is left held.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anyio
import httpx
import pytest

from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord, HoldState
from gatewaykit.ledger.postgres import PostgresLedger
from tests.ledger.backend_postgres import DSN, fresh_schema

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
K = 24  # requests the budget has room for
REQUESTS = 300
EVENTS = 50  # output tokens per stream, one event each
DELAY = 0.1  # seconds between events: every stream lasts ≥ 5 s
# Live streams extend their holds every TTL/3; a dead instance's holds expire after it.
# Long enough that a heartbeat is never late on a loaded 2-core machine (a late one lets
# the hold expire and frees room mid-stream — correct, but it would blur the count).
HOLD_TTL = 6.0
BODY = {
    "model": "gpt-4o-mini",
    "stream": True,
    "max_tokens": EVENTS,
    "messages": [{"role": "user", "content": "x" * 40}],  # ≈10 prompt tokens ≤ the fake's 12
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _wait_ready(client: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited with {proc.returncode}"
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(url)).status_code == 200:
                return
        await anyio.sleep(0.2)
    raise AssertionError(f"{url} did not become ready")


async def _create_key(ledger: PostgresLedger, user: str) -> str:
    new = generate_key()
    await ledger.create_key(
        ApiKeyRecord(key_id=new.key_id, key_hash=new.key_hash, prefix=new.prefix, user=user)
    )
    return new.key


async def test_three_instances_share_one_budget_and_survive_a_kill(tmp_path: Path) -> None:
    async with fresh_schema("gk_multi") as schema:
        url = f"{DSN}?schema={schema}"
        ledger = PostgresLedger(url, pool_max=2)
        await ledger.open()
        try:
            await _run(ledger, url, tmp_path)
        finally:
            await ledger.aclose()


async def _run(ledger: PostgresLedger, url: str, tmp_path: Path) -> None:
    calib_key = await _create_key(ledger, "calib")
    key = await _create_key(ledger, "u")
    env = {
        **os.environ,
        "OPENAI_BASE_URL": "",
        "OPENAI_API_KEY": "fake-upstream-key",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("GATEWAYKIT_MASTER_KEY", None)
    fake_port = _free_port()
    env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{fake_port}/v1"
    ports = [_free_port() for _ in range(3)]
    limits = httpx.Limits(max_connections=REQUESTS + 20, max_keepalive_connections=50)
    timeout = httpx.Timeout(60.0)
    with _processes() as procs, contextlib.ExitStack() as files:
        log = files.enter_context((tmp_path / "fake.log").open("wb"))
        procs.append(subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
            [sys.executable, "-m", "gatewaykit.testing", "--port", str(fake_port),
             "--events", str(EVENTS), "--delay", str(DELAY)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
        ))  # fmt: skip
        for i, port in enumerate(ports):
            log = files.enter_context((tmp_path / f"gateway{i}.log").open("wb"))
            procs.append(subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "examples/app.py", "--port", str(port), "--db", url,
                 "--hold-ttl", str(HOLD_TTL)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            ))  # fmt: skip
        gateways = procs[1:]
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            for port, proc in zip(ports, gateways, strict=True):
                await _wait_ready(client, f"http://127.0.0.1:{port}/healthz", proc)

            # Calibrate: what one request holds (read while its stream is open; then hang
            # up — that user has no budget).
            async with client.stream(
                "POST",
                f"http://127.0.0.1:{ports[0]}/v1/chat/completions",
                json=BODY,
                headers={"Authorization": f"Bearer {calib_key}"},
            ) as response:
                assert response.status_code == 200, await response.aread()
                (calib,) = [h for h in await ledger.holds() if "user:calib" in h.scopes]
            await ledger.set_budget("user:u", limit=calib.amount * K)

            statuses: dict[int, list[int]] = {0: [], 1: [], 2: []}
            all_started = anyio.Event()
            streaming = [0, 0, 0]
            errors: list[str] = []

            async def one(i: int) -> None:
                target = i % 3
                with contextlib.suppress(httpx.HTTPError):
                    async with client.stream(
                        "POST",
                        f"http://127.0.0.1:{ports[target]}/v1/chat/completions",
                        json=BODY,
                        headers={"Authorization": f"Bearer {key}"},
                    ) as response:
                        statuses[target].append(response.status_code)
                        if sum(map(len, statuses.values())) == REQUESTS:
                            all_started.set()
                        if response.status_code == 200:
                            streaming[target] += 1
                        elif response.status_code != 402:
                            errors.append((await response.aread()).decode())
                        async for _ in response.aiter_bytes():
                            pass

            with anyio.fail_after(45):
                async with anyio.create_task_group() as tg:
                    for i in range(REQUESTS):
                        tg.start_soon(one, i)
                    await all_started.wait()
                    codes = [c for per in statuses.values() for c in per]
                    assert errors == [], errors[:3]
                    assert (codes.count(200), codes.count(402)) == (K, REQUESTS - K), codes
                    # Kill the instance with the most open streams, mid-stream.
                    victim = max(range(3), key=lambda t: statuses[t].count(200))
                    assert streaming[victim] > 0
                    gateways[victim].send_signal(signal.SIGKILL)
                    gateways[victim].wait()

            # The survivors settled their streams; the victim's holds are still held
            # (nobody extends them now) until their TTL passes.
            live = await ledger.holds()
            assert 0 < len(live) <= statuses[victim].count(200)
            await anyio.sleep(HOLD_TTL + 0.5)
            # The surviving instances sweep every TTL/4 on their own; whatever they have
            # not expired yet, this sweep does. Either way every dead hold ends expired.
            await ledger.sweep()

    holds = [h for h in await ledger.holds(live_only=False, limit=10_000) if "user:u" in h.scopes]
    assert len(holds) == K  # no over-admission: exactly K holds were ever taken
    assert sum(h.state is HoldState.EXPIRED for h in holds) == len(live)
    assert await ledger.holds() == []  # no leaked hold
    assert await ledger.check() == []
    status = await ledger.status("user:u")
    assert status is not None
    assert status.held == 0
    assert status.spent == sum((h.charged for h in holds), Decimal(0))
    # Every completed stream cost at least its hold, so no room freed up while the 300
    # were being admitted: "exactly K" did not depend on timing.
    assert all(h.charged >= h.amount for h in holds if h.state is HoldState.SETTLED)
