"""Limiters under test: the in-process one, and Redis for real (GATEWAYKIT_TEST_REDIS_URL).

Each Redis limiter gets a key prefix of its own, deleted afterwards. ``redis_server``
starts a private redis-server on a spare port, for tests that stop it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gatewaykit.ratelimit import InProcessRateLimiter, RateLimiter, RedisRateLimiter

REDIS_URL = os.environ.get("GATEWAYKIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

MakeRedisLimiter = Callable[..., RedisRateLimiter]


@pytest.fixture
async def redis_limiter() -> AsyncIterator[MakeRedisLimiter]:
    """Makes Redis limiters on the test server sharing one fresh prefix (a cluster's view)."""
    prefix = f"gk_test:{secrets.token_hex(6)}:"
    made: list[RedisRateLimiter] = []

    def make(url: str = REDIS_URL, **options: Any) -> RedisRateLimiter:
        limiter = RedisRateLimiter.from_url(url, prefix=options.pop("prefix", prefix), **options)
        made.append(limiter)
        return limiter

    yield make
    if made:
        client = made[0].client
        with contextlib.suppress(Exception):
            async for key in client.scan_iter(match=prefix + "*"):
                await client.delete(key)
    for limiter in made:
        await limiter.aclose()


@pytest.fixture(params=["inprocess", pytest.param("redis", marks=pytest.mark.redis)])
def limiter(request: pytest.FixtureRequest, redis_limiter: MakeRedisLimiter) -> RateLimiter:
    if request.param == "inprocess":
        return InProcessRateLimiter()
    return redis_limiter()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server (no persistence) that a test may stop and start again."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            time.sleep(0.02)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
