"""Fixtures for the admin app's fast tests: a ledger on each backend and a client."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from gatewaykit.admin import admin_app
from gatewaykit.ledger.base import Ledger
from tests.admin.helpers import MASTER_KEY
from tests.ledger.backends import BACKENDS, Backend, FakeClock

PAGE_BACKENDS = [name for name in ("sqlite-file", "postgres") if name in BACKENDS]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())  # the pages show ages against the wall clock


@pytest.fixture(
    params=[pytest.param(BACKENDS[n], id=n, marks=BACKENDS[n].marks) for n in PAGE_BACKENDS]
)
async def ledger(
    request: pytest.FixtureRequest, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[Ledger]:
    backend: Backend = request.param
    async with backend.make(clock, tmp_path) as opener:
        store = opener()
        async with store:
            yield store
            assert await store.check() == []


@pytest.fixture
async def client(ledger: Ledger) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client of the admin app mounted at /admin (not logged in)."""
    host = Starlette(routes=[Mount("/admin", admin_app(ledger, master_key=MASTER_KEY))])
    transport = httpx.ASGITransport(host)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw/admin/") as http:
        yield http
