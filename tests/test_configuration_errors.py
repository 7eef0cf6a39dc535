"""Configuration mistakes are refused where they are made, with words naming the value
(coverage showed these checks unreached)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

import gatewaykit.outbox
from gatewaykit.errors import ConfigurationError
from gatewaykit.ledger.base import Period
from gatewaykit.outbox import OutboxSender, RetryPolicy, SQLiteOutbox
from gatewaykit.upstream import Upstream
from gatewaykit.usage import Usage


def _sender(**options: Any) -> OutboxSender:
    settings: dict[str, Any] = {"client": httpx.AsyncClient(), "base_url": "http://plane.test"}
    settings["gateway_token"] = "t"
    return OutboxSender(SQLiteOutbox(":memory:"), **{**settings, **options})


BAD: list[tuple[Callable[[], object], str]] = [
    (lambda: RetryPolicy(multiplier=0.5), "multiplier"),
    (lambda: RetryPolicy(jitter=2), "jitter"),
    (lambda: RetryPolicy(max_retry_after=-1), "max_retry_after"),
    (lambda: _sender(base_url="ftp://plane.test"), "must be http"),
    (lambda: _sender(gateway_token=""), "gateway token"),
    (lambda: _sender(concurrency=0), "concurrency"),
    (lambda: SQLiteOutbox(""), "file path"),
    (lambda: SQLiteOutbox(":memory:", synchronous="fast"), "synchronous"),
    (lambda: Period("rolling", 0), "positive number of seconds"),
    (lambda: Period("day", 5), "takes no seconds"),
    (lambda: Period("fortnight"), "unknown period kind"),  # type: ignore[arg-type]
    (lambda: Upstream("https://x.test", provider="azure"), "unknown upstream provider"),  # type: ignore[arg-type]
    (lambda: Upstream("https://x.test", api_key=5), "api_key must be a string"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("build", "words"), BAD)
def test_a_bad_setting_is_refused_naming_it(build: Callable[[], object], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        build()


@pytest.mark.parametrize("counts", [(-1, 0), (True, 0), (0, 1.5)])
def test_usage_counts_are_non_negative_ints(counts: tuple[Any, Any]) -> None:
    with pytest.raises(ValueError, match="non-negative int"):
        Usage(*counts)


def test_the_postgres_outbox_is_imported_on_first_use() -> None:
    from gatewaykit.outbox.postgres import PostgresOutbox

    assert gatewaykit.outbox.PostgresOutbox is PostgresOutbox
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        gatewaykit.outbox.Nope  # noqa: B018
