"""The registry of ledger backends the shared conformance suite runs against.

Each entry is a :class:`Backend`: ``make(clock, tmp_path)`` is an async context manager
that allocates one isolated, empty store and yields an *opener* — a zero-argument callable
returning a new, not yet opened ``Ledger`` on that store (call it again to "reopen" after
closing, where ``persistent`` is true). Every ledger must use ``clock`` as its store clock.

Another backend joins the suite by calling :func:`register` from its own module, imported
at the bottom of this file if it exists (``tests/ledger/backend_postgres.py`` for the
PostgresLedger), e.g.::

    register(Backend("postgres", make_pg, persistent=True, marks=(pytest.mark.postgres,)))
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from gatewaykit.ledger.base import Ledger

__all__ = ["BACKENDS", "Backend", "Clock", "FakeClock", "Opener", "register"]

Clock = Callable[[], float]
Opener = Callable[[], Ledger]

#: 2026-01-15 12:00:00 UTC, a Thursday: far from month and week boundaries.
START = 1_768_478_400.0


class FakeClock:
    """A store clock the tests move by hand."""

    def __init__(self, start: float = START) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "store time never goes backwards in these tests"
        self.t += seconds


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    make: Callable[[Clock, Path], AbstractAsyncContextManager[Opener]]
    #: The store survives close + reopen (files, servers); ``:memory:`` does not.
    persistent: bool = False
    #: pytest marks applied to every test parametrised with this backend.
    marks: tuple[Any, ...] = ()
    #: Hypothesis examples for the stateful test (each opens a fresh store; keep it short).
    stateful_examples: int = 25


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    BACKENDS[backend.name] = backend


@contextlib.asynccontextmanager
async def _sqlite_file(clock: Clock, tmp_path: Path) -> AsyncIterator[Opener]:
    from gatewaykit.ledger.sqlite import SQLiteLedger

    path = str(tmp_path / "ledger.db")
    yield lambda: SQLiteLedger(path, clock=clock)


@contextlib.asynccontextmanager
async def _sqlite_memory(clock: Clock, tmp_path: Path) -> AsyncIterator[Opener]:
    from gatewaykit.ledger.sqlite import SQLiteLedger

    yield lambda: SQLiteLedger(":memory:", clock=clock)


@contextlib.asynccontextmanager
async def _model(clock: Clock, tmp_path: Path) -> AsyncIterator[Opener]:
    from tests.ledger.model import ModelLedger

    model = ModelLedger(clock)  # one store: "reopening" returns the same state
    yield lambda: model


register(Backend("model", _model, persistent=True))
register(Backend("sqlite-file", _sqlite_file, persistent=True))
register(Backend("sqlite-memory", _sqlite_memory))

# Other engineers' backends register themselves from their own modules.
for _module in ("tests.ledger.backend_postgres",):
    if importlib.util.find_spec(_module) is not None:
        importlib.import_module(_module)

# A networked store costs a schema and a pool per example: keep its stateful run bounded
# unless its registration chose a number itself.
if "postgres" in BACKENDS and BACKENDS["postgres"].stateful_examples == Backend.stateful_examples:
    BACKENDS["postgres"] = dataclasses.replace(BACKENDS["postgres"], stateful_examples=6)
