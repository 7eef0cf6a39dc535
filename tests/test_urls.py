"""The one store-URL parser (open_ledger, open_outbox) and the one redactor."""

from __future__ import annotations

import pytest

from gatewaykit.errors import ConfigurationError, InvalidLedgerURLError
from gatewaykit.ledger.sqlite import SQLiteLedger
from gatewaykit.ledger.url import open_ledger
from gatewaykit.outbox.sqlite import SQLiteOutbox
from gatewaykit.outbox.url import open_outbox
from gatewaykit.urls import redact, store_target


@pytest.mark.parametrize(
    ("url", "hidden", "shown"),
    [
        ("postgresql://u:secret@h/db", "secret", "postgresql://u:***@h/db"),
        ("postgresql://u:se/cret@h/db", "cret", "postgresql://u:***@h/db"),
        ("postgresql://:secret@h/db", "secret", "postgresql://:***@h/db"),
        ("postgresql://u:p@ss:w@h:5432/db", "ss:w", "postgresql://u:***@h:5432/db"),
        ("postgres://u@h/db?password=secret&sslmode=off", "secret", None),
        ("postgresql://h/db?sslmode=off&PASSWORD=secret", "secret", None),
        # upstream and control-plane URLs: Basic-auth user info, tokens in the query
        ("https://user:pass@llm.example/v1", "pass", "https://***@llm.example/v1"),
        ("https://sk-live-abc@llm.example/v1", "sk-live-abc", "https://***@llm.example/v1"),
        (
            "https://llm.example/v1?api-version=2024-10-21&api_key=sk-1",
            "sk-1",
            "https://llm.example/v1?api-version=2024-10-21&api_key=***",
        ),
        ("https://cp.example/?token=t0k&x=1", "t0k", "https://cp.example/?token=***&x=1"),
        ("https://llm.example/v1?key=k3y", "k3y", "https://llm.example/v1?key=***"),
        ("https://llm.example/v1?sig=s1g&Access_Token=t", "s1g", None),
        ("https://llm.example/v1?Access_Token=t0ken", "t0ken", None),
        ("redis://:redispass@cache:6379/0", "redispass", "redis://:***@cache:6379/0"),
    ],
)
def test_redact_hides_every_password(url: str, hidden: str, shown: str | None) -> None:
    assert hidden not in redact(url)
    if shown is not None:
        assert redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u@h/db",
        "postgresql://h/db",
        "sqlite:///a.db",
        "not a url",
        "https://api.openai.com/v1",
        "https://llm.example/openai?api-version=2024-10-21",
    ],
)
def test_redact_leaves_urls_without_a_password_alone(url: str) -> None:
    assert redact(url) == url


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("sqlite:///a.db", ("sqlite", "a.db")),
        ("sqlite:////abs/a.db", ("sqlite", "/abs/a.db")),
        ("sqlite://:memory:", ("sqlite", ":memory:")),
        ("sqlite:///:memory:", ("sqlite", ":memory:")),
        ("SQLite:///a.db", ("sqlite", "a.db")),
        ("postgres://u@h/db", ("postgresql", "postgres://u@h/db")),
        ("postgresql://u@h/db", ("postgresql", "postgresql://u@h/db")),
    ],
)
def test_store_target(url: str, target: tuple[str, str]) -> None:
    assert store_target(url, what="ledger") == target


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("a.db", "not a ledger URL"),
        (None, "not a ledger URL"),
        ("sqlite://a.db", "three slashes"),
        ("sqlite:///", "three slashes"),
        ("mysql://h/db", "unknown ledger URL scheme 'mysql'"),
    ],
)
def test_open_ledger_names_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(InvalidLedgerURLError, match=message):
        open_ledger(url)


def test_open_outbox_raises_configuration_error_naming_the_outbox() -> None:
    with pytest.raises(ConfigurationError, match="not an outbox URL") as info:
        open_outbox("outbox.db")
    assert not isinstance(info.value, InvalidLedgerURLError)
    with pytest.raises(ConfigurationError, match="unknown outbox URL scheme"):
        open_outbox("redis://h")


def test_both_openers_build_sqlite_backends() -> None:
    assert isinstance(open_ledger("sqlite://:memory:"), SQLiteLedger)
    assert isinstance(open_outbox("sqlite://:memory:"), SQLiteOutbox)


def test_a_missing_postgres_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "gatewaykit.ledger.postgres", None)
    monkeypatch.setitem(sys.modules, "gatewaykit.outbox.postgres", None)
    with pytest.raises(InvalidLedgerURLError, match=r"pip install 'gatewaykit\[postgres\]'"):
        open_ledger("postgresql://u@h/db")
    with pytest.raises(ConfigurationError, match="a PostgreSQL outbox needs the extra"):
        open_outbox("postgresql://u@h/db")


def test_a_libpq_keyword_string_is_refused_without_its_password() -> None:
    """``--db "host=db user=gk password=s3cret"`` (libpq's other spelling) is not a URL:
    the error says so without repeating the password."""
    with pytest.raises(InvalidLedgerURLError, match="not a ledger URL") as info:
        open_ledger("host=db user=gk password=s3cret dbname=gk")
    assert "s3cret" not in str(info.value)
    assert "s3cret" not in redact("host=db password=s3cret")
