"""The admin page's small parts: formatting, the throttle, the signer, the guard's edges."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer

from gatewaykit.admin import admin_app
from gatewaykit.admin.formatting import bar_widths, duration, period_words, usd, when
from gatewaykit.admin.security import LoginThrottle, Session, SessionSigner
from gatewaykit.errors import LedgerUnavailableError
from gatewaykit.ledger.base import BudgetStatus, Period
from gatewaykit.ledger.sqlite import SQLiteLedger
from tests.admin.helpers import MASTER_KEY, csrf_of, log_in

NOW = datetime(2026, 3, 1, tzinfo=timezone.utc)


def status(limit: str | None, spent: str = "0", held: str = "0") -> BudgetStatus:
    return BudgetStatus(
        scope="user:a",
        limit=None if limit is None else Decimal(limit),
        period=Period(),
        spent=Decimal(spent),
        held=Decimal(held),
        window_start=NOW,
        resets_at=None,
    )


def test_money_times_and_durations_read_well() -> None:
    assert [usd(None), usd(0), usd(Decimal("1E+3")), usd(Decimal("0.1"))] == [
        "no limit", "$0.00", "$1000.00", "$0.10",
    ]  # fmt: skip
    assert when(None) == "never"
    assert when(NOW) == "2026-03-01 00:00:00 UTC"
    assert [duration(s) for s in (-5, 45, 720, 3 * 3600 + 300, 2 * 86400 + 4 * 3600)] == [
        "-5 s", "45 s", "12 min", "3 h 5 min", "2 d 4 h",
    ]  # fmt: skip
    assert duration(timedelta(minutes=2)) == "2 min"
    assert [period_words(Period(k)) for k in ("none", "day")] == ["in total", "per day"]
    assert period_words(Period("rolling", 3600)) == "per 1 h 0 min"


def test_budget_bars() -> None:
    assert bar_widths(status("10", "2", "1")) == {"spent": 20.0, "held": 10.0, "full": False}
    assert bar_widths(status("1", "2", "1")) == {"spent": 100.0, "held": 0.0, "full": True}
    assert bar_widths(status("0", "0.5")) == {"spent": 100, "held": 0, "full": True}
    assert bar_widths(status("0")) == {"spent": 0, "held": 0, "full": False}
    assert bar_widths(status(None, "5")) == {"spent": 0, "held": 0, "full": False}


def test_the_signer_refuses_whatever_it_did_not_make_as_a_session() -> None:
    signer = SessionSigner(b"s" * 32, max_age=60)
    session = Session.fresh(authenticated=True)
    assert signer.loads(signer.dumps(session)) == session
    same_key = URLSafeTimedSerializer(b"s" * 32, salt="gatewaykit.admin.session")
    for data in (["n", True], {"n": 1, "a": True}, {"n": "x", "a": "yes"}):
        assert signer.loads(same_key.dumps(data)) is None
    assert signer.loads(None) is None
    assert not signer.csrf_ok(session, None)
    assert signer.csrf_ok(session, signer.csrf_token(session))


def test_the_throttle_forgets_old_failures_and_bounds_its_memory() -> None:
    now = [0.0]
    throttle = LoginThrottle(max_failures=2, window=10, max_clients=2, clock=lambda: now[0])
    throttle.succeeded("nobody")  # nothing counted: nothing to forget
    throttle.attempt("a")
    throttle.attempt("a")
    assert throttle.retry_after("a") == 10
    now[0] = 5
    throttle.attempt("b")
    throttle.attempt("c")  # full: "a" and "b" are recent, so the oldest ("a") goes
    assert throttle.retry_after("a") == 0
    now[0] = 16
    throttle.attempt("d")  # full again: the expired ones are dropped first
    assert throttle.retry_after("d") == 0


async def raw_lifespan(app: Any) -> list[str]:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


@pytest.mark.anyio
async def test_lifespan_passes_the_security_headers_untouched() -> None:
    async with SQLiteLedger(":memory:") as ledger:
        app = admin_app(ledger, master_key=MASTER_KEY)
        assert await raw_lifespan(app) == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]


@pytest.mark.anyio
async def test_a_broken_form_body_or_a_down_ledger_is_an_answer_not_a_crash() -> None:
    async with SQLiteLedger(":memory:") as ledger:

        class Down:
            def __getattr__(self, name: str) -> Any:
                return getattr(ledger, name)

            async def budgets(self) -> list[BudgetStatus]:
                raise LedgerUnavailableError("connection refused")

        app = admin_app(Down(), master_key=MASTER_KEY, failure_delay=0)
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw/") as http:
            await log_in(http)
            page = await http.get("budgets")
            assert page.status_code == 503
            assert "LedgerUnavailableError" in page.text
            assert "connection refused" not in page.text  # the store's words stay in logs
            broken = await http.post(
                "keys",
                content=b"--x\r\nContent-Disposition: form-data\r\n\r\nno end",
                headers={"content-type": "multipart/form-data; boundary=x"},
            )
            assert broken.status_code == 403
            assert csrf_of(await http.get("keys/abc/revoke"))  # unknown key: 404 page
