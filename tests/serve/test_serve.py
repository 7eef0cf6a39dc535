"""``gatewaykit serve --config`` as a real process in front of the fake provider, driven by
the official openai SDK; ``--workers 2`` on PostgreSQL keeps one budget exact."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import openai
import pytest
from click.testing import CliRunner

from gatewaykit.cli import main
from gatewaykit.testing import FakeBehavior
from tests.ledger.backend_postgres import DSN, fresh_schema

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_SECRET = "sk-fake-upstream-secret"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "GATEWAYKIT_"))}
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra)
    return env


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """``python *args``, stopped with SIGTERM (then SIGKILL) when the block ends."""
    with log.open("ab") as out:
        child = subprocess.Popen([sys.executable, *args], env=env, cwd=log.parent, stdout=out,
                                 stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def wait_ready(url: str, child: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert child.poll() is None, log.read_text()
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code in (200, 404, 405):
                return
        assert time.monotonic() < deadline, f"{url} did not start:\n{log.read_text()}"
        time.sleep(0.1)


@contextlib.contextmanager
def fake_provider(tmp_path: Path, *extra: str) -> Iterator[str]:
    """gatewaykit's fake provider on its own port, requiring ``UPSTREAM_SECRET``."""
    port = free_port()
    log = tmp_path / "fake.log"
    args = ["-m", "gatewaykit.testing", "--port", str(port), "--api-key", UPSTREAM_SECRET]
    with process([*args, *extra], log, environment()) as child:
        wait_ready(f"http://127.0.0.1:{port}/", child, log)
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serve(tmp_path: Path, config: str, *flags: str) -> Iterator[str]:
    """``gatewaykit serve --config`` on a free port; yields its URL."""
    path = tmp_path / "gatewaykit.toml"
    path.write_text(config)
    port = free_port()
    log = tmp_path / "serve.log"
    env = environment(UPSTREAM_KEY=UPSTREAM_SECRET)
    args = ["-m", "gatewaykit", "serve", "--config", str(path), "--port", str(port), *flags]
    with process(args, log, env) as child:
        wait_ready(f"http://127.0.0.1:{port}/healthz", child, log)
        yield f"http://127.0.0.1:{port}"
    text = log.read_text()
    # One process shuts down gracefully, then re-raises SIGTERM (the conventional status);
    # the supervisor of several workers exits 0 once they have.
    assert child.returncode in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert "Traceback" not in text
    assert UPSTREAM_SECRET not in text


def cli(*args: str) -> Any:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def config_text(fake: str, ledger: str, **server: int) -> str:
    lines = [f"{key} = {value}" for key, value in server.items()]
    return f"""
[server]
{chr(10).join(lines)}

[ledger]
url = "{ledger}"
hold_ttl = 60

[[upstreams]]
provider = "openai"
base_url = "{fake}/v1"
api_key_env = "UPSTREAM_KEY"

[standalone]
default_max_output_tokens = 256
"""


def test_serve_a_config_file_to_the_openai_sdk(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'gateway.db'}"
    with fake_provider(tmp_path) as fake, serve(tmp_path, config_text(fake, db)) as url:
        key = cli("--db", db, "keys", "create", "--user", "alice", "--budget", "5")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key["key"], max_retries=0)
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}], stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == FakeBehavior().output_text
        answer = client.responses.create(model="gpt-4o-mini", input="Hi")
        assert answer.output_text == FakeBehavior().output_text
        stranger = openai.OpenAI(base_url=f"{url}/v1", api_key="gk_nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.responses.create(model="gpt-4o-mini", input="Hi")
    [budget] = cli("--db", db, "budgets", "show", f"key:{key['key_id']}")
    records = cli("--db", db, "usage", "--user", "alice")
    assert [r["status"] for r in records] == ["success", "success"]
    assert Decimal(budget["spent"]) == sum(Decimal(r["cost"]) for r in records) > 0
    assert budget["held"] == "0"
    assert cli("--db", db, "check")["ok"]


@pytest.mark.postgres
def test_two_workers_on_postgresql_keep_one_budget_exact(tmp_path: Path) -> None:
    admitted_room = 8
    requests = 40

    async def run() -> None:
        async with fresh_schema("gk_serve") as schema:
            db = f"{DSN}?schema={schema}"
            await anyio.to_thread.run_sync(drive, db)

    def drive(db: str) -> None:
        config = config_text("{fake}", db, workers=2)
        # Streams that last long enough that every admitted one is still holding when the
        # last request is admitted or refused: "exactly K" cannot depend on timing.
        with (
            fake_provider(tmp_path, "--events", "20", "--delay", "0.1") as fake,
            serve(tmp_path, config.replace("{fake}", fake)) as url,
        ):
            calibrate = cli("--db", db, "keys", "create", "--user", "calibrate")
            hold = held_by_one_request(url, calibrate["key"], db)
            key = cli("--db", db, "keys", "create", "--user", "bob")
            limit = hold * admitted_room
            cli("--db", db, "budgets", "set", "user:bob", "--limit", str(limit))
            statuses = anyio.run(many, url, key["key"], requests)
        assert sorted(statuses) == [200] * admitted_room + [402] * (requests - admitted_room)
        [budget] = cli("--db", db, "budgets", "show", "user:bob")
        records = cli("--db", db, "usage", "--user", "bob", "--limit", "1000")
        assert len(records) == admitted_room
        assert all(r["status"] == "success" for r in records)
        assert Decimal(budget["spent"]) == sum(Decimal(r["cost"]) for r in records)
        assert budget["held"] == "0"
        assert cli("--db", db, "holds") == []
        assert cli("--db", db, "check")["ok"]

    anyio.run(run)
    starts = (tmp_path / "serve.log").read_text().count("Started server process")
    assert starts == 2  # two workers served


def held_by_one_request(url: str, key: str, db: str) -> Decimal:
    """What one request of the load holds: read while its stream is open."""
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=BODY, timeout=30,
        headers={"authorization": f"Bearer {key}"},
    ) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        [hold] = cli("--db", db, "holds")
        return Decimal(hold["amount"])


BODY = {
    "model": "gpt-4o-mini",
    "stream": True,
    "max_tokens": 20,
    "messages": [{"role": "user", "content": "x" * 40}],
}


async def many(url: str, key: str, count: int) -> list[int]:
    statuses: list[int] = []
    # A connection per request: the kernel spreads them over both workers' accepts.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def one() -> None:
            async with client.stream(
                "POST", f"{url}/v1/chat/completions", json=BODY,
                headers={"authorization": f"Bearer {key}"},
            ) as response:  # fmt: skip
                statuses.append(response.status_code)
                await response.aread()

        async with anyio.create_task_group() as tasks:
            for _ in range(count):
                tasks.start_soon(one)
    return statuses
