"""The ``gatewaykit`` command line against a real SQLite ledger (docs/cli.md)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
from click.testing import CliRunner, Result

from gatewaykit.cli import main
from gatewaykit.ledger import Ledger, UsageRecord, open_ledger

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(main, list(args), env=env)
    assert "Traceback" not in result.output
    # Only click's own exits and our deliberate ones; anything else is a crash.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def cli_json(*args: str) -> Any:
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def with_ledger(url: str, action: Callable[[Ledger], Awaitable[T]], **options: Any) -> T:
    """Run ``action`` on the ledger at ``url``; ``options`` go to the backend (e.g. clock)."""

    async def run() -> T:
        ledger = open_ledger(url, **options)
        await ledger.open()
        try:
            return await action(ledger)
        finally:
            await ledger.aclose()

    return anyio.run(run)


def is_iso_utc(text: str) -> bool:
    offset = datetime.fromisoformat(text).utcoffset()
    return offset is not None and offset.total_seconds() == 0


# -- keys -------------------------------------------------------------------------------


def test_keys_create_prints_the_key_once_and_stores_only_its_hash(db: str) -> None:
    created = cli_json("--db", db, "keys", "create", "--user", "alice", "--json")
    assert set(created) == {"key", "key_id", "user", "expires_at"}
    assert created["expires_at"] is None
    assert created["user"] == "alice"
    assert created["key"].startswith(f"gk_{created['key_id']}_")

    listed = cli_json("--db", db, "keys", "list", "--json")
    assert listed == [
        {
            "key_id": created["key_id"],
            "prefix": listed[0]["prefix"],
            "user": "alice",
            "revoked": False,
            "team": None,
            "rpm": None,
            "tpm": None,
            "max_concurrent": None,
            "models": None,
            "created_at": listed[0]["created_at"],
            "expires_at": None,
        }
    ]
    assert is_iso_utc(listed[0]["created_at"])
    assert created["key"] not in json.dumps(listed)
    assert created["key"].startswith(listed[0]["prefix"].rstrip("…"))
    path = db.removeprefix("sqlite:///")
    assert created["key"].encode() not in Path(path).read_bytes()


def test_keys_create_readable_output_shows_the_key_and_a_warning(db: str) -> None:
    result = cli("--db", db, "keys", "create", "--user", "bob", "--budget", "2.50")
    assert result.exit_code == 0, result.output
    assert "gk_" in result.stdout
    assert "not shown again" in result.stdout
    assert "$2.50 in total" in result.stdout


def test_keys_create_with_budget_makes_a_key_scope(db: str) -> None:
    created = cli_json(
        "--db", db, "keys", "create", "--user", "alice", "--budget", "5", "--period", "day",
        "--rpm", "60", "--tpm", "90000", "--max-concurrent", "3", "--json",
    )  # fmt: skip
    [budget] = cli_json("--db", db, "budgets", "show", f"key:{created['key_id']}", "--json")
    assert budget["scope"] == f"key:{created['key_id']}"
    assert budget["limit"] == "5"
    assert budget["period"] == "day"
    assert budget["spent"] == "0"
    assert budget["held"] == "0"
    assert budget["remaining"] == "5"
    assert is_iso_utc(budget["resets_at"])

    async def find(ledger: Ledger) -> Any:
        return await ledger.list_keys(user="alice")

    [record] = with_ledger(db, find)
    assert (record.rpm, record.tpm, record.max_concurrent) == (60, 90000, 3)


def test_keys_update_sets_and_removes_limits(db: str) -> None:
    created = cli_json("--db", db, "keys", "create", "--user", "alice", "--rpm", "60", "--json")
    key_id = created["key_id"]
    assert cli_json("--db", db, "keys", "update", key_id, "--tpm", "5000", "--json") == {
        "key_id": key_id,
        "rpm": 60,
        "tpm": 5000,
        "max_concurrent": None,
    }
    result = cli("--db", db, "keys", "update", key_id, "--rpm", "none", "--max-concurrent", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Key {key_id}: rpm unlimited, tpm 5000, max_concurrent 2.\n"

    async def find(ledger: Ledger) -> Any:
        return await ledger.list_keys(user="alice")

    [record] = with_ledger(db, find)
    assert (record.rpm, record.tpm, record.max_concurrent) == (None, 5000, 2)
    missing = cli("--db", db, "keys", "update", "nope", "--rpm", "1")
    assert missing.exit_code == 2
    assert "no key with id 'nope'" in missing.stderr


def test_keys_create_with_team_and_models(db: str) -> None:
    created = cli_json(
        "--db", db, "keys", "create", "--user", "alice", "--team", "ml",
        "--model", "gpt-4o-mini", "--model", "gpt-4o", "--json",
    )  # fmt: skip

    async def find(ledger: Ledger) -> Any:
        return await ledger.list_keys(user="alice")

    [record] = with_ledger(db, find)
    assert record.key_id == created["key_id"]
    assert record.team == "ml"
    assert record.allowed_models == ("gpt-4o-mini", "gpt-4o")
    assert "ml" in cli("--db", db, "keys", "list").stdout


def test_keys_list_table_and_user_filter(db: str) -> None:
    cli_json("--db", db, "keys", "create", "--user", "alice", "--json")
    bob = cli_json("--db", db, "keys", "create", "--user", "bob", "--json")
    only_bob = cli_json("--db", db, "keys", "list", "--user", "bob", "--json")
    assert [k["key_id"] for k in only_bob] == [bob["key_id"]]
    table = cli("--db", db, "keys", "list")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split() == [
        "KEY_ID", "PREFIX", "USER", "TEAM", "RPM", "TPM", "MAX_CONCURRENT", "MODELS", "CREATED",
        "EXPIRES", "REVOKED",
    ]  # fmt: skip
    assert "alice" in table.stdout
    assert "bob" in table.stdout


def test_keys_list_shows_rpm_models_creation_and_expiry(db: str) -> None:
    """issue 15 §7: what a key may do, and until when, is visible without --json."""
    before = datetime.now(timezone.utc)
    created = cli_json(
        "--db", db, "keys", "create", "--user", "alice", "--rpm", "30", "--model", "gpt-4o",
        "--model", "gpt-4o-mini", "--expires", "30d", "--json",
    )  # fmt: skip
    expires = datetime.fromisoformat(created["expires_at"])
    assert timedelta(days=30) - timedelta(seconds=2) <= expires - before <= timedelta(days=30)
    [listed] = cli_json("--db", db, "keys", "list", "--json")
    assert listed["rpm"] == 30
    assert listed["models"] == ["gpt-4o", "gpt-4o-mini"]
    assert listed["expires_at"] == created["expires_at"]
    assert before - timedelta(seconds=1) <= datetime.fromisoformat(listed["created_at"])
    [header, row] = cli("--db", db, "keys", "list").stdout.splitlines()
    cells = dict(zip(header.split(), row.split(), strict=True))
    assert cells["RPM"] == "30"
    assert cells["MODELS"] == "gpt-4o,gpt-4o-mini"
    assert cells["EXPIRES"] == expires.strftime("%Y-%m-%dT%H:%MZ")
    assert cells["CREATED"].startswith(before.strftime("%Y-%m-%d"))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2099-01-31", "2099-01-31T00:00:00+00:00"),
        ("2099-01-31T18:00:00+01:00", "2099-01-31T17:00:00+00:00"),
        ("2099-01-31 18:00", "2099-01-31T18:00:00+00:00"),
    ],
)
def test_keys_create_expires_at_a_date_time(db: str, given: str, expected: str) -> None:
    created = cli_json("--db", db, "keys", "create", "--user", "a", "--expires", given, "--json")
    assert created["expires_at"] == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [("yesterday", "neither a span"), ("2020-01-01", "in the past"), ("0d", "in the past")],
)
def test_keys_create_refuses_a_bad_expiry(db: str, given: str, message: str) -> None:
    result = cli("--db", db, "keys", "create", "--user", "a", "--expires", given)
    assert result.exit_code == 2
    assert message in result.output
    assert "gk_" not in result.output


@pytest.mark.parametrize(
    "amount", ["1e3", "1E3", "1_000", "+5", "$5", "5 USD", "0x10", "NaN", "5."]
)
def test_money_must_be_written_out(db: str, amount: str) -> None:
    """issue 15 §7: ``--limit 1e3`` was silently $1000."""
    for args in (["budgets", "set", "user:a", "--limit", amount],
                 ["keys", "create", "--user", "a", "--budget", amount]):  # fmt: skip
        result = cli("--db", db, *args)
        assert result.exit_code == 2, result.output
        assert "not a plain amount of USD" in result.output
    for plain in ("1000.50", ".5", " 7 "):
        assert cli("--db", db, "budgets", "set", "user:a", "--limit", plain).exit_code == 0


def test_keys_revoke(db: str) -> None:
    created = cli_json("--db", db, "keys", "create", "--user", "alice", "--json")
    revoked = cli("--db", db, "keys", "revoke", created["key_id"])
    assert revoked.exit_code == 0
    assert created["key_id"] in revoked.stdout
    [listed] = cli_json("--db", db, "keys", "list", "--json")
    assert listed["revoked"] is True


def test_revoking_an_unknown_key_is_a_user_error(db: str) -> None:
    cli_json("--db", db, "keys", "create", "--user", "alice", "--json")
    result = cli("--db", db, "keys", "revoke", "nosuchkey")
    assert result.exit_code == 2
    assert "nosuchkey" in result.stderr
    assert result.stdout == ""


# -- budgets ----------------------------------------------------------------------------


def test_budgets_set_and_show(db: str) -> None:
    shown = cli_json("--db", db, "budgets", "set", "user:alice", "--limit", "10.5", "--json")
    assert shown["scope"] == "user:alice"
    assert shown["limit"] == "10.5"
    assert shown["period"] == "none"
    assert shown["resets_at"] is None

    hourly = cli("--db", db, "budgets", "set", "team:ml", "--limit", "100", "--period", "3600")
    assert hourly.stdout == "Budget team:ml: $100 per 3600 seconds.\n"
    # Changing only the limit keeps the window.
    changed = cli_json("--db", db, "budgets", "set", "team:ml", "--limit", "200", "--json")
    assert changed["period"] == "3600"
    assert changed["limit"] == "200"

    listing = cli_json("--db", db, "budgets", "show", "--json")
    assert [b["scope"] for b in listing] == ["team:ml", "user:alice"]
    for budget in listing:
        assert set(budget) == {
            "scope", "limit", "period", "spent", "held", "remaining", "resets_at"
        }  # fmt: skip

    unlimited = cli_json("--db", db, "budgets", "set", "user:alice", "--limit", "none", "--json")
    assert unlimited["limit"] is None
    assert unlimited["remaining"] is None

    table = cli("--db", db, "budgets", "show")
    assert table.exit_code == 0
    assert table.stdout.split()[:7] == [
        "SCOPE", "LIMIT", "PERIOD", "SPENT", "HELD", "REMAINING", "RESETS_AT"
    ]  # fmt: skip


def test_budgets_show_unknown_scope_is_a_user_error(db: str) -> None:
    cli_json("--db", db, "budgets", "set", "user:alice", "--limit", "1", "--json")
    result = cli("--db", db, "budgets", "show", "user:nobody")
    assert result.exit_code == 2
    assert "user:nobody" in result.stderr


# -- usage, holds, sweep, check ---------------------------------------------------------


def seed_traffic(db: str) -> str:
    """One settled request and one live hold, written through the ledger API."""
    created = cli_json(
        "--db", db, "keys", "create", "--user", "alice", "--budget", "1", "--json"
    )  # fmt: skip
    scopes = [f"key:{created['key_id']}", "user:alice"]

    async def traffic(ledger: Ledger) -> None:
        await ledger.reserve("req-1", scopes, Decimal("0.01"), ttl=60)
        record = UsageRecord(
            request_id="req-1",
            model="gpt-4o-mini",
            endpoint="/v1/chat/completions",
            status="success",
            usage_source="provider",
            key_id=created["key_id"],
            user="alice",
            input_tokens=12,
            output_tokens=40,
            cost=Decimal("0.0000258"),
        )
        await ledger.settle("req-1", Decimal("0.0000258"), record=record)
        await ledger.reserve("req-2", scopes, Decimal("0.02"), ttl=60)

    with_ledger(db, traffic)
    return str(created["key_id"])


def test_usage_lists_records(db: str) -> None:
    key_id = seed_traffic(db)
    [record] = cli_json("--db", db, "usage", "--json")
    assert is_iso_utc(record.pop("created_at"))
    assert record == {
        "request_id": "req-1",
        "key_id": key_id,
        "user": "alice",
        "model": "gpt-4o-mini",
        "endpoint": "/v1/chat/completions",
        "input_tokens": 12,
        "output_tokens": 40,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "cost": "0.0000258",
        "latency_ms": None,
        "usage_source": "provider",
        "status": "success",
    }
    assert cli_json("--db", db, "usage", "--user", "bob", "--json") == []
    assert len(cli_json("--db", db, "usage", "--limit", "1", "--json")) == 1
    table = cli("--db", db, "usage")
    assert "req-1" in table.stdout
    assert "0.0000258" in table.stdout
    assert cli("--db", db, "usage", "--limit", "0").exit_code == 2


def test_budgets_show_reflects_spend_and_holds(db: str) -> None:
    key_id = seed_traffic(db)
    [budget] = cli_json("--db", db, "budgets", "show", f"key:{key_id}", "--json")
    assert budget["spent"] == "0.0000258"
    assert budget["held"] == "0.02"
    assert Decimal(budget["remaining"]) == Decimal(1) - Decimal("0.0000258") - Decimal("0.02")


def test_holds_lists_live_holds(db: str) -> None:
    key_id = seed_traffic(db)
    [hold] = cli_json("--db", db, "holds", "--json")
    assert set(hold) == {"hold_id", "scopes", "amount", "state", "expires_at"}
    assert hold["hold_id"] == "req-2"
    assert hold["scopes"] == sorted([f"key:{key_id}", "user:alice"])
    assert hold["amount"] == "0.02"
    assert hold["state"] == "held"
    assert is_iso_utc(hold["expires_at"])
    everything = cli_json("--db", db, "--json", "holds", "--all")
    assert {h["hold_id"]: h["state"] for h in everything} == {"req-1": "settled", "req-2": "held"}
    assert "req-2" in cli("--db", db, "holds").stdout


def test_sweep_expires_holds_past_their_ttl(db: str) -> None:
    async def short_hold(ledger: Ledger) -> None:
        await ledger.reserve("short", ["user:alice"], Decimal("0.5"), ttl=0.05)

    # Written an hour ago by the store clock: the CLI, on the real clock, finds it expired.
    with_ledger(db, short_hold, clock=lambda: time.time() - 3600)
    assert cli_json("--db", db, "sweep", "--json") == {"expired": 1}
    assert cli_json("--db", db, "holds", "--json") == []
    again = cli("--db", db, "sweep")
    assert again.exit_code == 0
    assert "Expired 0 holds" in again.stdout


def test_check_passes_on_a_healthy_ledger(db: str) -> None:
    seed_traffic(db)
    result = cli("--db", db, "check")
    assert result.exit_code == 0
    assert "OK" in result.stdout
    assert cli_json("--db", db, "check", "--json") == {"ok": True, "violations": []}


def test_json_flag_before_the_subcommand(db: str) -> None:
    cli_json("--db", db, "keys", "create", "--user", "alice", "--json")
    assert len(cli_json("--db", db, "--json", "keys", "list")) == 1
    assert cli_json("--db", db, "--json", "budgets", "show") == []


def test_db_from_the_environment(tmp_path: Path) -> None:
    env = {"GATEWAYKIT_DB": f"sqlite:///{tmp_path / 'env.db'}"}
    assert cli("keys", "create", "--user", "alice", "--json", env=env).exit_code == 0
    assert (tmp_path / "env.db").exists()
    listed = cli("keys", "list", "--json", env=env)
    assert len(json.loads(listed.stdout)) == 1


# -- user errors: exit 2, one line, no traceback ----------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "create", "--user", "alice", "--budget", "abc"],
        ["keys", "create", "--user", "alice", "--budget", "-1"],
        ["keys", "create", "--user", "alice", "--budget", "nan"],
        ["keys", "create", "--user", "alice", "--budget", "5", "--period", "fortnight"],
        ["keys", "create", "--user", "alice", "--period", "day"],
        ["keys", "create", "--user", "has space"],
        ["keys", "create", "--user", "alice", "--team", "a b"],
        ["keys", "create", "--user", "alice", "--rpm", "0"],
        ["keys", "create", "--user", "alice", "--tpm", "-5"],
        ["keys", "create", "--user", "alice", "--max-concurrent", "0"],
        ["keys", "update", "k_1"],
        ["keys", "update", "k_1", "--tpm", "0"],
        ["keys", "update", "k_1", "--rpm", "lots"],
        ["keys", "update", "k_1", "--max-concurrent", "0"],
        ["keys", "create"],
        ["budgets", "set", "alice", "--limit", "5"],
        ["budgets", "set", "user:alice", "--limit", "5$"],
        ["budgets", "set", "user:alice"],
        ["budgets", "show", "not a scope"],
        ["nosuchcommand"],
    ],
)
def test_usage_errors_exit_2(db: str, args: list[str]) -> None:
    result = cli("--db", db, *args)
    assert result.exit_code == 2, result.output
    assert "Error" in result.stderr


def test_bad_amount_stores_nothing(db: str) -> None:
    cli("--db", db, "keys", "create", "--user", "alice", "--budget", "abc")
    assert not Path(db.removeprefix("sqlite:///")).exists()


@pytest.mark.parametrize("url", ["nonsense", "mysql://x@y/z", "sqlite://relative.db", "sqlite:///"])
def test_bad_database_urls_exit_2(url: str) -> None:
    result = cli("--db", url, "keys", "create", "--user", "alice")
    assert result.exit_code == 2
    assert "URL" in result.stderr or "url" in result.stderr


def test_reading_a_missing_sqlite_file_is_an_error_not_a_new_database(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    result = cli("--db", f"sqlite:///{missing}", "budgets", "show")
    assert result.exit_code == 2
    assert "no database" in result.stderr
    assert not missing.exists()


def test_unopenable_sqlite_path_exits_2(tmp_path: Path) -> None:
    result = cli("--db", f"sqlite:///{tmp_path}/no/such/dir/x.db", "keys", "create", "--user", "a")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error")


def test_a_file_that_is_not_a_ledger_exits_2(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
        conn.execute("PRAGMA user_version = 999")
    text = tmp_path / "text.db"
    text.write_text("this is not a database\n" * 100)
    for path in (foreign, text):
        result = cli("--db", f"sqlite:///{path}", "keys", "list")
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("Error")


def test_unreachable_postgres_exits_2() -> None:
    pytest.importorskip("asyncpg")
    result = cli("--db", "postgresql://postgres:secret@127.0.0.1:1/test", "keys", "list")
    assert result.exit_code == 2, result.output
    assert "secret" not in result.output


# -- check finds corruption -------------------------------------------------------------


def test_check_exits_1_on_a_corrupted_ledger(db: str) -> None:
    seed_traffic(db)
    path = db.removeprefix("sqlite:///")
    corrupt_a_counter(path)
    result = cli("--db", db, "check")
    assert result.exit_code == 1, result.output
    assert "VIOLATION" in result.stdout
    as_json = cli("--db", db, "check", "--json")
    assert as_json.exit_code == 1
    report = json.loads(as_json.stdout)
    assert report["ok"] is False
    assert report["violations"]


def corrupt_a_counter(path: str) -> None:
    """Add spend to a counter behind the ledger's back (breaks I3: spent == Σ charges)."""
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            spent = [c for c in columns if c.startswith("spent")]
            if spent:
                conn.execute(f"UPDATE {table} SET {spent[0]} = {spent[0]} + 12345")
                return
    raise AssertionError(f"no spend counter column found in {tables}")


# -- entry points -----------------------------------------------------------------------


def test_python_dash_m_gatewaykit(db: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GATEWAYKIT_DB": db}
    created = subprocess.run(
        [sys.executable, "-m", "gatewaykit", "keys", "create", "--user", "alice", "--json"],
        env=env, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["user"] == "alice"
    bad = subprocess.run(
        [sys.executable, "-m", "gatewaykit", "--db", "nonsense", "keys", "list"],
        env=env, capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "Usage: gatewaykit" in subprocess.run(
        [sys.executable, "-m", "gatewaykit", "--help"],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip


# -- PostgreSQL -------------------------------------------------------------------------

DSN = os.environ.get("GATEWAYKIT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def pg_db() -> Iterator[str]:
    asyncpg = pytest.importorskip("asyncpg")
    schema = f"cli_{uuid.uuid4().hex[:12]}"

    async def drop() -> None:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    yield f"{DSN}?schema={schema}"
    anyio.run(drop)


@pytest.mark.postgres
def test_the_cli_on_postgres(pg_db: str) -> None:
    key_id = seed_traffic(pg_db)
    assert [k["key_id"] for k in cli_json("--db", pg_db, "keys", "list", "--json")] == [key_id]
    [budget] = cli_json("--db", pg_db, "budgets", "show", f"key:{key_id}", "--json")
    assert (budget["spent"], budget["held"]) == ("0.0000258", "0.02")
    assert [h["hold_id"] for h in cli_json("--db", pg_db, "holds", "--json")] == ["req-2"]
    assert cli_json("--db", pg_db, "check", "--json") == {"ok": True, "violations": []}
    [total] = cli_json("--db", pg_db, "usage", "--group-by", "key,model", "--since", "1h", "--json")
    assert (total["key"], total["model"], total["cost"]) == (key_id, "gpt-4o-mini", "0.0000258")

    asyncpg = pytest.importorskip("asyncpg")
    schema = pg_db.rsplit("=", 1)[1]

    async def corrupt() -> None:
        conn = await asyncpg.connect(DSN)
        try:
            await conn.execute(f"UPDATE {schema}.counters SET spent = spent + 12345")
        finally:
            await conn.close()

    anyio.run(corrupt)
    assert cli("--db", pg_db, "check").exit_code == 1


def test_python_m_gatewaykit_without_its_dependencies_says_what_to_do() -> None:
    """issue 15 §1: from a checkout, with a Python lacking anyio, it was a traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-S", "-m", "gatewaykit", "--help"],  # -S: no site-packages
        env=env, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "a dependency is missing in this Python" in done.stderr
    assert "source .nox/example/bin/activate" in done.stderr


def test_keys_list_shows_the_cap_on_requests_in_flight(db: str) -> None:
    cli_json("--db", db, "keys", "create", "--user", "alice", "--max-concurrent", "3", "--json")
    cli_json("--db", db, "keys", "create", "--user", "bob", "--json")
    listed = {k["user"]: k for k in cli_json("--db", db, "keys", "list", "--json")}
    assert (listed["alice"]["max_concurrent"], listed["bob"]["max_concurrent"]) == (3, None)
    header, *rows = cli("--db", db, "keys", "list").stdout.splitlines()
    cells = {row.split()[2]: dict(zip(header.split(), row.split(), strict=True)) for row in rows}
    assert (cells["alice"]["MAX_CONCURRENT"], cells["bob"]["MAX_CONCURRENT"]) == ("3", "-")
