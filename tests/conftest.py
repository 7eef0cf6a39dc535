from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _collector_settings_restored() -> Iterator[None]:
    """Apps built by build_app tune the collector when they start (gatewaykit.runtime);
    each test leaves the test process's collector as it found it."""
    threshold = gc.get_threshold()
    yield
    if gc.get_threshold() != threshold or gc.get_freeze_count():
        gc.unfreeze()
        gc.set_threshold(*threshold)
