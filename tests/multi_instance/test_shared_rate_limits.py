"""Two example-app processes share one Redis and one ledger: a key's limits hold across both.

Each process is ``examples/app.py --redis URL --db sqlite:///<shared file>`` with its
built-in fake provider (16 tokens per chat request). Requests go to both processes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import ApiKeyRecord
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.pricing import estimate_prompt_tokens
from tests.processes import child_process
from tests.ratelimit.conftest import REDIS_URL, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

BODY = {
    "model": "gpt-4o-mini",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "x" * 40}],
}
ESTIMATE = estimate_prompt_tokens(40) + 50
USED = 16  # the example app's fake provider: 12 prompt + 4 output tokens


@contextlib.contextmanager
def _gateways(db: str, tmp_path: Path) -> Iterator[list[str]]:
    """Two gateway processes on free ports; yields their base URLs."""
    urls = []
    with contextlib.ExitStack() as stack:
        for n in range(2):
            port = free_port()
            stack.enter_context(
                child_process(
                    "examples.app",
                    ["--port", str(port), "--db", db, "--redis", REDIS_URL],
                    tmp_path / f"gateway{n}.log",
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        yield urls


async def _wait_ready(client: httpx.AsyncClient, urls: list[str], tmp_path: Path) -> None:
    deadline = time.monotonic() + 40
    for url in urls:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{url}/healthz")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not become ready; see {tmp_path}/gateway*.log")
            await anyio.sleep(0.1)


async def _key(db: Path, *, rpm: int | None = None, tpm: int | None = None) -> str:
    new = generate_key()
    async with SQLiteLedger(str(db)) as ledger:
        await ledger.create_key(
            ApiKeyRecord(
                key_id=new.key_id,
                key_hash=new.key_hash,
                prefix=new.prefix,
                user="u",
                rpm=rpm,
                tpm=tpm,
            )
        )
    return new.key


async def test_two_processes_share_rpm_and_tpm_through_redis(tmp_path: Path) -> None:
    db_path = tmp_path / "ledger.db"
    rpm_key = await _key(db_path, rpm=10)
    tpm = 3 * ESTIMATE + 10
    tpm_key = await _key(db_path, tpm=tpm)
    # Keys are new, so are their scopes' Redis keys (which expire a minute after use).
    with _gateways(f"sqlite:///{db_path}", tmp_path) as urls:
        async with httpx.AsyncClient(timeout=30) as client:
            await _wait_ready(client, urls, tmp_path)
            responses: list[httpx.Response] = []

            async def one(n: int) -> None:
                responses.append(
                    await client.post(
                        f"{urls[n % 2]}/v1/chat/completions",
                        json=BODY,
                        headers={"authorization": f"Bearer {rpm_key}"},
                    )
                )

            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for n in range(25):
                        tg.start_soon(one, n)
            statuses = [r.status_code for r in responses]
            assert (statuses.count(200), statuses.count(429)) == (10, 15), statuses
            for refused in (r for r in responses if r.status_code == 429):
                assert 1 <= int(refused.headers["retry-after"]) <= 60
                assert refused.headers["x-ratelimit-limit-requests"] == "10"
                assert refused.json()["error"]["type"] == "rate_limit_error"

            # Tokens: each process sees what the other settled, exactly.
            remaining = []
            for n in range(3):
                response = await client.post(
                    f"{urls[n % 2]}/v1/chat/completions",
                    json=BODY,
                    headers={"authorization": f"Bearer {tpm_key}"},
                )
                assert response.status_code == 200, response.text
                remaining.append(int(response.headers["x-ratelimit-remaining-tokens"]))
            assert remaining == [tpm - ESTIMATE - n * USED for n in range(3)]
    async with SQLiteLedger(str(db_path)) as ledger:
        assert len(await ledger.usage(limit=100)) == 13  # every admitted request charged
        assert await ledger.holds() == []
        assert await ledger.check() == []
