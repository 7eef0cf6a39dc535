"""Loading the example scripts (they are files, not a package) and seeding their ledgers."""

from __future__ import annotations

import importlib.util
import sys
from decimal import Decimal
from pathlib import Path
from types import ModuleType

from gatewaykit.keys import generate_key
from gatewaykit.ledger import ApiKeyRecord, BudgetStatus, Ledger, UsageRecord, open_ledger

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


async def create_key(db_url: str, *, user: str, budget: Decimal | None = None) -> tuple[str, str]:
    """A new key (and optionally its own budget) written straight to the ledger."""
    new = generate_key()
    async with _Opened(db_url) as ledger:
        if budget is not None:
            await ledger.set_budget(f"key:{new.key_id}", limit=budget)
        await ledger.create_key(
            ApiKeyRecord(key_id=new.key_id, key_hash=new.key_hash, prefix=new.prefix, user=user)
        )
    return new.key, new.key_id


async def ledger_state(db_url: str, scope: str) -> tuple[BudgetStatus | None, list[UsageRecord]]:
    """A scope's budget and every usage record, after checking the invariants."""
    async with _Opened(db_url) as ledger:
        assert await ledger.check() == []
        return await ledger.status(scope), await ledger.usage()


class _Opened:
    def __init__(self, url: str) -> None:
        self.ledger: Ledger = open_ledger(url)

    async def __aenter__(self) -> Ledger:
        await self.ledger.open()
        return self.ledger

    async def __aexit__(self, *exc: object) -> None:
        await self.ledger.aclose()
