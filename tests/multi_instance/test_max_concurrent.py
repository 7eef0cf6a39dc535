"""A key's cap on requests in flight holds across gateway processes (issue 17).

Two example-app processes share one PostgreSQL ledger, in front of one slow fake provider
process. A key with ``max_concurrent`` 3 sends 10 streamed requests at once, spread over
both: exactly 3 are admitted, 7 get a 429 in OpenAI's envelope with ``Retry-After``.
Once the three streams are over, the key may stream again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord
from gatewaykit.ledger.postgres import PostgresLedger
from tests.ledger.backend_postgres import DSN, fresh_schema
from tests.multi_instance.test_postgres_gateways import _free_port, _processes, _wait_ready

pytestmark = [pytest.mark.anyio, pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CAP = 3
REQUESTS = 10
EVENTS = 60
DELAY = 0.1  # every stream lasts ≥ 6 s: all ten are decided while the first three stream
BODY = {
    "model": "gpt-4o-mini",
    "stream": True,
    "max_tokens": EVENTS,
    "messages": [{"role": "user", "content": "Say hello"}],
}


async def test_a_keys_cap_holds_across_two_gateway_processes(tmp_path: Path) -> None:
    async with fresh_schema("gk_cap") as schema:
        url = f"{DSN}?schema={schema}"
        async with PostgresLedger(url, pool_max=2) as ledger:
            new = generate_key()
            await ledger.create_key(
                ApiKeyRecord(
                    key_id=new.key_id,
                    key_hash=new.key_hash,
                    prefix=new.prefix,
                    user="u",
                    max_concurrent=CAP,
                )
            )
            await _run(ledger, url, new.key, tmp_path)
            assert await ledger.holds() == []
            assert await ledger.check() == []


async def _run(ledger: PostgresLedger, url: str, key: str, tmp_path: Path) -> None:
    fake_port = _free_port()
    env = {
        **os.environ,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{fake_port}/v1",
        "OPENAI_API_KEY": "fake-upstream-key",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("GATEWAYKIT_MASTER_KEY", None)
    ports = [_free_port() for _ in range(2)]
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
                [sys.executable, "examples/app.py", "--port", str(port), "--db", url],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            ))  # fmt: skip
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
            for port, proc in zip(ports, procs[1:], strict=True):
                await _wait_ready(client, f"http://127.0.0.1:{port}/healthz", proc)

            refusals: list[httpx.Response] = []
            admitted = 0
            decided = anyio.Event()
            in_flight_at_once: list[int] = []

            async def one(i: int) -> None:
                nonlocal admitted
                target = f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions"
                async with client.stream("POST", target, json=BODY, headers=headers) as response:
                    if response.status_code == 200:
                        admitted += 1
                    else:
                        await response.aread()
                        refusals.append(response)
                    if admitted + len(refusals) == REQUESTS:
                        in_flight_at_once.append(len(await ledger.holds()))
                        decided.set()
                    async for _ in response.aiter_bytes():
                        pass

            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    for i in range(REQUESTS):
                        group.start_soon(one, i)
                    await decided.wait()
                    assert admitted == CAP
                    assert in_flight_at_once == [CAP]

                # The three streams are over: the key may stream again, on either process.
                for port in ports:
                    response = await client.post(
                        f"http://127.0.0.1:{port}/v1/chat/completions",
                        json={**BODY, "stream": False},
                        headers=headers,
                    )
                    assert response.status_code == 200, response.text

    assert len(refusals) == REQUESTS - CAP
    for refused in refusals:
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert error["scope"].startswith("key:")
        assert error["max_concurrent"] == CAP
