"""examples/app.py sweeps expired holds on its own, every quarter of the hold TTL."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from gatewaykit import open_ledger
from tests.examples.helpers import load_example

pytestmark = pytest.mark.anyio

example = load_example("app")


async def test_the_app_expires_a_dead_requests_hold_without_any_other_request(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'gateway.db'}"
    settings = example.Settings(db=db, hold_ttl=0.4)
    with socket.create_server(("127.0.0.1", 0)) as fake:  # offline: the built-in provider
        app = example.build_app(settings, fake_socket=fake)
        async with app.router.lifespan_context(app):
            await expire_a_crashed_hold(db, tmp_path)
    assert stored_state(tmp_path / "gateway.db", "req-crashed") == "expired"


async def expire_a_crashed_hold(db: str, tmp_path: Path) -> None:
    async with open_ledger(db) as ledger:
        # A hold as a crashed request leaves it: nobody will settle or release it.
        await ledger.reserve("req-crashed", ["user:ghost"], Decimal("0.5"), ttl=0.4)
    # Read the stored state directly: a ledger read would expire the due hold itself.
    for _ in range(50):
        if stored_state(tmp_path / "gateway.db", "req-crashed") != "held":
            break
        await anyio.sleep(0.1)


def stored_state(path: Path, hold_id: str) -> str:
    with contextlib.closing(sqlite3.connect(path)) as db:
        (state,) = db.execute("SELECT state FROM holds WHERE hold_id = ?", (hold_id,)).fetchone()
    return str(state)
