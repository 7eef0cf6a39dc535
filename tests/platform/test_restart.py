"""A gateway killed with reports queued delivers them after it restarts."""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from pathlib import Path

import anyio
import httpx
import pytest

from gatewaykit.modes.platform import PlatformMode
from gatewaykit.outbox import open_outbox
from gatewaykit.testing import FakeControlPlane, serve_app

from .conftest import GATEWAY_TOKEN, POSTGRES_DSN, until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_reports_survive_sigkill_and_go_out_after_restart(
    tmp_path: Path, backend: str
) -> None:
    table = f"gk_outbox_kill_{uuid.uuid4().hex[:12]}"
    url = f"sqlite:///{tmp_path}/outbox.db" if backend == "sqlite" else POSTGRES_DSN
    try:
        await run_kill_and_restart(url, table)
    finally:
        if backend == "postgres":
            import asyncpg

            conn = await asyncpg.connect(POSTGRES_DSN)
            try:
                await conn.execute(f"DROP TABLE IF EXISTS {table}")
            finally:
                await conn.close()


async def run_kill_and_restart(url: str, table: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tests.platform._kill_child", url, table, "20"]
    async with await anyio.open_process(command, env=env, cwd=str(ROOT)) as child:
        assert child.stdout is not None
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await child.stdout.receive()
        child.send_signal(signal.SIGKILL)
        assert await child.wait() == -signal.SIGKILL
    keys = json.loads(line)
    assert len(keys) == 20

    async with open_outbox(url, table=table) as box:
        assert await box.size() == 20  # nothing lost, nothing delivered
        [item] = [i for i in await box.claim(limit=50, lease=0, due_only=False) if i.key == keys[0]]
        assert item.attempts > 0  # the child had been retrying

    plane = FakeControlPlane(gateway_token=GATEWAY_TOKEN)
    async with serve_app(plane.app) as plane_url, httpx.AsyncClient() as client:
        outbox = open_outbox(url, table=table)
        async with PlatformMode(
            base_url=plane_url, gateway_token=GATEWAY_TOKEN, client=client, outbox=outbox
        ):

            async def drained() -> bool:
                return await outbox.size() == 0

            await until(drained, 10)
    assert sorted(plane.reports) == sorted(keys)
    assert all(len(plane.posts_for(key)) == 1 for key in keys)
    assert plane.reports["req_4:att_1"]["usage"]["input_tokens"] == 5
