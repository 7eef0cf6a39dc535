"""The admin pages against each ledger backend: what they show and what their forms change."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import httpx
import pytest

from gatewaykit.admin import admin_app
from gatewaykit.ledger.base import DenialStore, Ledger, Period, UsageRecord
from tests.admin.helpers import MASTER_KEY, log_in, post_form
from tests.ledger.backends import FakeClock

pytestmark = pytest.mark.anyio


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> httpx.AsyncClient:
    assert (await log_in(client)).status_code == 303
    return client


async def test_create_a_key_with_budget_rpm_models_and_expiry(
    admin: httpx.AsyncClient, ledger: Ledger
) -> None:
    form = {
        "user": "alice",
        "team": "ml",
        "budget": "5",
        "period": "day",
        "rpm": "60",
        "models": "gpt-4o-mini, claude-haiku-4-5",
        "expires": "2099-01-31",
    }
    created = await post_form(admin, "keys", "keys", form)
    assert created.status_code == 200
    [record] = await ledger.list_keys()
    assert (record.user, record.team, record.rpm) == ("alice", "ml", 60)
    assert record.allowed_models == ("gpt-4o-mini", "claude-haiku-4-5")
    assert record.expires_at is not None
    assert record.expires_at.isoformat() == "2099-01-31T00:00:00+00:00"
    status = await ledger.status(f"key:{record.key_id}")
    assert status is not None
    assert (status.limit, status.period) == (Decimal(5), Period("day"))
    assert f"gk_{record.key_id}_" in created.text
    listing = (await admin.get("keys")).text
    for shown in (record.prefix, "alice", "ml", "$5.00 per day", "gpt-4o-mini, claude-haiku-4-5"):
        assert shown in listing


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"user": ""}, "a key needs a user"),
        ({"user": "two words"}, "invalid scope"),
        ({"user": "a", "budget": "-1"}, "must not be negative"),
        ({"user": "a", "budget": "1.5e400"}, "between"),
        ({"user": "a", "period": "day"}, "give the budget too"),
        ({"user": "a", "rpm": "0"}, "whole number"),
        ({"user": "a", "expires": "tomorrow"}, "YYYY-MM-DD"),
    ],
)
async def test_a_bad_key_form_is_answered_on_the_page(
    admin: httpx.AsyncClient, ledger: Ledger, form: dict[str, str], message: str
) -> None:
    response = await post_form(admin, "keys", "keys", form)
    assert response.status_code == 400
    assert message in response.text
    assert 'role="alert"' in response.text
    assert await ledger.list_keys() == []
    assert await ledger.budgets() == []


async def test_revoke_asks_first_then_revokes(admin: httpx.AsyncClient, ledger: Ledger) -> None:
    await post_form(admin, "keys", "keys", {"user": "bob"})
    [record] = await ledger.list_keys()
    confirm = await admin.get(f"keys/{record.key_id}/revoke")
    assert confirm.status_code == 200
    assert "Revoke the key" in confirm.text
    assert not (await ledger.list_keys())[0].revoked  # looking is not revoking
    page = f"keys/{record.key_id}/revoke"
    done = await post_form(admin, page, page, {})
    assert (done.status_code, done.headers["location"]) == (
        303,
        f"/admin/keys?revoked={record.key_id}",
    )
    assert (await ledger.list_keys())[0].revoked
    assert "revoked" in (await admin.get("keys")).text
    assert (await admin.get("keys/nope/revoke")).status_code == 404
    page = "keys/nope/revoke"
    assert (await post_form(admin, "keys", page, {})).status_code == 404


async def test_budgets_show_spent_held_and_change(admin: httpx.AsyncClient, ledger: Ledger) -> None:
    await ledger.set_budget("user:carol", limit=Decimal(10), period=Period("month"))
    await ledger.reserve("r1", ["user:carol"], Decimal("2.5"), ttl=60)
    await ledger.settle("r1", Decimal("2"))
    await ledger.reserve("r2", ["user:carol"], Decimal("1"), ttl=60)
    page = (await admin.get("budgets")).text
    for shown in ("user:carol", "$2.00", "$1.00", "$7.00", "$10.00 per month"):
        assert shown in page
    assert 'width="20.0"' in page
    assert 'x="20.0" width="10.0"' in page

    changed = await post_form(admin, "budgets", "budgets", {"scope": "user:carol", "limit": "4"})
    assert changed.headers["location"] == "/admin/budgets?set=user%3Acarol"
    status = await ledger.status("user:carol")
    assert status is not None
    assert (status.limit, status.period) == (Decimal(4), Period("month"))  # period kept
    await post_form(
        admin, "budgets", "budgets", {"scope": "team:ml", "limit": "none", "period": "week"}
    )
    team = await ledger.status("team:ml")
    assert team is not None
    assert (team.limit, team.period) == (None, Period("week"))
    bad = await post_form(admin, "budgets", "budgets", {"scope": "nokind", "limit": "1"})
    assert bad.status_code == 400
    assert "invalid scope" in bad.text
    bad = await post_form(admin, "budgets", "budgets", {"scope": "user:carol", "limit": ""})
    assert bad.status_code == 400
    assert "give a limit in USD" in bad.text
    await ledger.release("r2")


async def test_holds_show_age_and_ttl_and_sweep_expires_them(
    admin: httpx.AsyncClient, ledger: Ledger, clock: FakeClock
) -> None:
    await ledger.reserve("req-live", ["user:dan"], Decimal("0.5"), ttl=600)
    await ledger.reserve("req-old", ["user:dan"], Decimal("0.25"), ttl=30)
    page = (await admin.get("holds")).text
    assert "req-live" in page
    assert "req-old" in page
    assert "$0.50" in page
    clock.advance(60)
    assert "expired" in (await admin.get("holds")).text
    swept = await post_form(admin, "holds", "holds/sweep", {})
    assert swept.headers["location"] == "/admin/holds?swept=1"
    page = (await admin.get("holds?swept=1")).text
    assert "Sweep expired 1 hold." in page
    assert "req-old" not in page
    assert "req-live" in page
    await ledger.release("req-live")


async def test_overview_shows_budgets_holds_and_the_check(
    admin: httpx.AsyncClient, ledger: Ledger
) -> None:
    await ledger.set_budget("user:erin", limit=Decimal(1), period=Period("day"))
    await ledger.set_budget("user:zed", limit=Decimal(0))
    await ledger.set_budget("user:open", limit=None)
    await ledger.reserve("r", ["user:erin"], Decimal("0.4"), ttl=60)
    page = (await admin.get("")).text
    assert "every invariant holds" in page
    assert page.index("user:erin") < page.index("user:zed")  # 40 % used before 0 %
    assert "user:open" not in page  # no limit: not "near" one
    assert "2 budgets with a limit" in page
    assert 'id="live-holds">1<' in page
    await ledger.release("r")


async def charge(
    ledger: Ledger, request_id: str, *, user: str, model: str, cost: str, key: str = "k1"
) -> None:
    """One settled request with its usage record, as the middleware writes them."""
    await ledger.reserve(request_id, [f"user:{user}"], Decimal(cost), ttl=60)
    record = UsageRecord(
        request_id=request_id,
        model=model,
        endpoint="chat.completions",
        status="success",
        usage_source="provider",
        key_id=key,
        user=user,
        input_tokens=10,
        output_tokens=5,
        cost=Decimal(cost),
    )
    await ledger.settle(request_id, Decimal(cost), record=record)


async def test_usage_filters_totals_chart_and_csv(admin: httpx.AsyncClient, ledger: Ledger) -> None:
    await charge(ledger, "r1", user="ann", model="gpt-4o-mini", cost="0.25")
    await charge(ledger, "r2", user="ann", model="claude-haiku-4-5", cost="0.5")
    await charge(ledger, "r3", user="ben", model="gpt-4o-mini", cost="1", key="k2")
    page = await admin.get("usage")
    assert 'id="usage-cost">$1.75<' in page.text
    assert page.text.count("<rect x=") == 2  # one bar per model with spend today
    ann = await admin.get("usage", params={"user": "ann"})
    assert 'id="usage-requests">2<' in ann.text
    assert 'id="usage-cost">$0.75<' in ann.text
    assert "r3" not in ann.text
    assert 'href="/admin/usage.csv?user=ann"' in ann.text
    only = await admin.get("usage", params={"model": "gpt-4o-mini", "key": "k2"})
    assert 'id="usage-cost">$1.00<' in only.text
    future = await admin.get("usage", params={"since": "2999-01-01"})
    assert 'id="usage-requests">0<' in future.text
    assert "No usage matches." in future.text

    download = await admin.get("usage.csv", params={"user": "ann"})
    assert download.headers["content-type"] == "text/csv; charset=utf-8"
    assert download.headers["content-disposition"] == (
        'attachment; filename="gatewaykit-usage.csv"'
    )
    rows = list(csv.DictReader(download.text.splitlines()))
    assert sorted((r["request_id"], r["cost"]) for r in rows) == [("r1", "0.25"), ("r2", "0.5")]

    bad = await admin.get("usage", params={"since": "last tuesday"})
    assert bad.status_code == 400
    assert "YYYY-MM-DD" in bad.text
    assert (await admin.get("usage.csv", params={"until": "x"})).status_code == 400


async def test_overview_and_keys_show_spend_and_last_use(
    admin: httpx.AsyncClient, ledger: Ledger
) -> None:
    await post_form(admin, "keys", "keys", {"user": "ann"})
    [key] = await ledger.list_keys()
    await charge(ledger, "r1", user="ann", model="gpt-4o-mini", cost="0.125", key=key.key_id)
    await charge(ledger, "r2", user="bo", model="gpt-4o", cost="2")
    page = (await admin.get("")).text
    assert 'id="spent-today">$2.125<' in page
    assert 'id="requests-24h">2<' in page
    users = page.split("Top users this month")[1].split("Top models")[0]
    assert users.index("bo") < users.index("ann")  # by spend
    keys_page = (await admin.get("keys")).text
    row = keys_page.split(f'id="key-{key.key_id}"')[1].split("</tr>")[0]
    assert datetime.now(timezone.utc).strftime("%Y-%m-%d") in row  # last used today


async def test_a_failed_check_is_red_on_the_overview(ledger: Ledger) -> None:
    class Broken:
        """The ledger, except that its check finds a violation."""

        def __getattr__(self, name: str) -> Any:
            return getattr(ledger, name)

        async def check(self) -> list[str]:
            return ["I2: reserved 5 != live holds 3 on user:<b>x</b>"]

    app = admin_app(Broken(), master_key=MASTER_KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw/") as http:
        await log_in(http)
        page = (await http.get("")).text
    assert 'class="notice error check" role="alert"' in page
    assert "Ledger check failed" in page
    assert "I2: reserved 5 != live holds 3 on user:&lt;b&gt;x&lt;/b&gt;" in page


async def test_overview_counts_denials_of_the_last_24_hours_by_reason(
    admin: httpx.AsyncClient, ledger: Ledger
) -> None:
    page = (await admin.get("")).text
    assert 'id="denials-24h">0<' in page
    assert "none refused" in page
    hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    assert isinstance(ledger, DenialStore)
    await ledger.add_denials(
        {
            (hour, "auth"): 3,
            (hour - timedelta(hours=23), "budget"): 1,
            (hour - timedelta(hours=2), "auth"): 2,
            (hour, "custom_reason"): 1,  # another writer's reason: shown as it is
            (hour - timedelta(hours=24), "rate_limit"): 50,  # older than 24 h
        }
    )
    page = (await admin.get("")).text
    assert 'id="denials-24h">7<' in page
    reasons = page.split('id="denials-by-reason">')[1].split("</ul>")[0]
    assert reasons == (
        "<li>Bad or missing key (401): 5</li><li>Budget exhausted (402): 1</li>"
        "<li>custom_reason: 1</li>"
    )
