"""AsyncResource and BackgroundWorker: the one ``async with`` of stores, clients, workers."""

from __future__ import annotations

import anyio
import pytest

from gatewaykit.errors import ConfigurationError
from gatewaykit.resource import BackgroundWorker

pytestmark = pytest.mark.anyio


class Ticker(BackgroundWorker):
    def __init__(self) -> None:
        self.events: list[str] = []
        self.ran = anyio.Event()

    async def _starting(self) -> None:
        self.events.append("starting")

    async def _run(self) -> None:
        self.events.append("run")
        self.ran.set()
        await anyio.sleep_forever()

    async def _stopped(self) -> None:
        self.events.append("stopped")


async def test_a_worker_runs_between_open_and_aclose() -> None:
    ticker = Ticker()
    async with ticker as entered:
        assert entered is ticker
        assert ticker.running
        await ticker.ran.wait()
        with pytest.raises(ConfigurationError, match="this Ticker is already running"):
            await ticker.open()
    assert not ticker.running
    assert ticker.events == ["starting", "run", "stopped"]
    await ticker.aclose()  # a second close does nothing
    assert ticker.events == ["starting", "run", "stopped"]


async def test_a_failed_start_leaves_the_worker_closed() -> None:
    class Failing(Ticker):
        async def _starting(self) -> None:
            raise OSError("store down")

    failing = Failing()
    with pytest.raises(OSError, match="store down"):
        await failing.open()
    assert not failing.running
    await failing.aclose()
    assert failing.events == []
