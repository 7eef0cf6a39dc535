"""Fixtures for the ledger conformance suite: every test runs on every registered backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gatewaykit.ledger.base import Ledger
from tests.ledger.backends import BACKENDS, Backend, FakeClock, Opener


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=[pytest.param(b, id=name, marks=b.marks) for name, b in BACKENDS.items()])
def backend(request: pytest.FixtureRequest) -> Backend:
    value: Backend = request.param
    return value


@pytest.fixture
async def opener(backend: Backend, clock: FakeClock, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens ledgers on one fresh store (call it again to reopen a persistent store)."""
    async with backend.make(clock, tmp_path) as open_ledger:
        yield open_ledger


@pytest.fixture
async def ledger(opener: Opener) -> AsyncIterator[Ledger]:
    """An open ledger on a fresh store, checked for invariant violations at teardown."""
    store = opener()
    await store.open()
    try:
        yield store
        assert await store.check() == []
    finally:
        await store.aclose()
