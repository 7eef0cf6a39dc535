"""The ``async with`` protocol of the library's stores, clients and background workers, once.

``AsyncResource``: entering opens (``open()``), leaving closes (``aclose()``); hosts that
manage lifetimes by hand call the two directly. ``BackgroundWorker``: a resource that runs
one loop in a task group between the two.
"""

from __future__ import annotations

import abc
from typing import TypeVar

import anyio
import anyio.abc

from gatewaykit.errors import ConfigurationError

__all__ = ["AsyncResource", "BackgroundWorker"]

_R = TypeVar("_R", bound="AsyncResource")


class AsyncResource(abc.ABC):
    """``async with`` calls ``open()`` on entry and ``aclose()`` on exit."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Take what the resource needs (connect, create, start)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release what ``open()`` took; a second call does nothing."""

    async def __aenter__(self: _R) -> _R:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class BackgroundWorker(AsyncResource):
    """Runs ``_run()`` in the background while open: ``open()`` awaits ``_starting()``
    then starts it; ``aclose()`` cancels it, then awaits ``_stopped()`` shielded."""

    _tg: anyio.abc.TaskGroup | None = None

    @property
    def running(self) -> bool:
        return self._tg is not None

    async def open(self) -> None:
        if self._tg is not None:
            raise ConfigurationError(f"this {type(self).__name__} is already running")
        await self._starting()
        tg = anyio.create_task_group()
        await tg.__aenter__()
        tg.start_soon(self._run)
        self._tg = tg

    async def aclose(self) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self._stopped()

    async def _starting(self) -> None:
        """Work done before the loop starts (a failure here leaves the worker closed)."""

    @abc.abstractmethod
    async def _run(self) -> None:
        """The loop; it is cancelled by ``aclose()``."""

    async def _stopped(self) -> None:
        """Work done after the loop stopped, shielded from cancellation."""
