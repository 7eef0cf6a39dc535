"""The admin pages: login, overview, keys, budgets, usage, holds (one handler each)."""

from __future__ import annotations

import secrets
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.datastructures import FormData
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gatewaykit.admin.app import Admin, Visit
from gatewaykit.admin.charts import MAX_DAYS, spend_chart
from gatewaykit.admin.reports import UsageQuery, usage_csv
from gatewaykit.admin.security import Session
from gatewaykit.errors import ConfigurationError
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import (
    ApiKeyRecord,
    BudgetStatus,
    DenialStore,
    Ledger,
    Period,
    validate_scopes,
)

if TYPE_CHECKING:
    from gatewaykit.ledger.base import UsageGroup, UsageTotal
from gatewaykit.money import parse_usd

__all__ = ["routes"]


def _text(form: FormData | None, name: str) -> str:
    value = form.get(name) if form is not None else None
    return value.strip() if isinstance(value, str) else ""


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- login -------------------------------------------------------------------------------


async def login(admin: Admin, visit: Visit) -> Response:
    request = visit.request
    if not admin.needs_login or (request.method == "GET" and visit.session.authenticated):
        return admin.redirect(request, "/")
    if request.method == "GET":
        return admin.render(visit, "login.html", error=None)
    client = request.client.host if request.client else "unknown"
    wait = admin.throttle.retry_after(client)
    if wait:
        response = admin.render(
            visit, "login.html", 429, error=f"Too many attempts. Try again in {wait:.0f} s."
        )
        response.headers["Retry-After"] = str(max(int(wait), 1))
        return response
    admin.throttle.attempt(client)
    if admin.master_key_matches(_text(visit.form, "master_key")):
        admin.throttle.succeeded(client)
        visit.session = Session.fresh(authenticated=True)  # a new nonce: no fixation
        return admin.redirect(request, "/")
    await admin.fail_slowly()
    return admin.render(visit, "login.html", 401, error="That key was not accepted.")


async def logout(admin: Admin, visit: Visit) -> Response:
    visit.session = Session.fresh()
    return admin.redirect(visit.request, "/login")


# -- overview ----------------------------------------------------------------------------


def _used(status: BudgetStatus) -> Decimal:
    """The share of a limited budget spent or held (a zero limit is full once used)."""
    assert status.limit is not None
    if status.limit == 0:
        return Decimal(1) if status.spent or status.held else Decimal(0)
    return (status.spent + status.held) / status.limit


async def overview(admin: Admin, visit: Visit) -> Response:
    ledger = admin.ledger
    now = _now()
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month = today.replace(day=1)
    budgets = await ledger.budgets()
    limited = sorted((b for b in budgets if b.limit is not None), key=_used, reverse=True)
    holds = await ledger.holds(live_only=True, limit=10_000)
    return admin.render(
        visit,
        "overview.html",
        page="overview",
        now=now,
        budgets=limited[:10],
        budget_count=len(limited),
        live_holds=len(holds),
        held=sum((h.amount for h in holds), Decimal(0)),
        violations=await ledger.check(),
        spend={
            "today": await _spent(ledger, since=today),
            "month": await _spent(ledger, since=month),
            "requests": await _requests(ledger, since=now - timedelta(days=1)),
        },
        denials=await _denials(
            ledger, since=now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
        ),
        top={
            "users": await _top(ledger, "user", since=month),
            "models": await _top(ledger, "model", since=month),
        },
    )


async def _spent(ledger: Ledger, *, since: datetime) -> Decimal:
    return sum((t.cost for t in await ledger.usage_totals(group_by=(), since=since)), Decimal(0))


async def _requests(ledger: Ledger, *, since: datetime) -> int:
    return sum(t.requests for t in await ledger.usage_totals(group_by=(), since=since))


#: How the Overview names the reasons ``gatewaykit.denials`` counts under.
_REASONS = {
    "auth": "Bad or missing key (401)",
    "forbidden": "Forbidden (403)",
    "budget": "Budget exhausted (402)",
    "rate_limit": "Rate limited (429)",
    "bad_request": "Bad request (400, 404, 413)",
    "unavailable": "Ledger unavailable (503)",
}


async def _denials(ledger: Ledger, *, since: datetime) -> dict[str, Any] | None:
    """The refusals of the hours from ``since``: their total and (label, count) per reason,
    most first; None for a ledger that does not count them (no ``DenialStore``)."""
    if not isinstance(ledger, DenialStore):
        return None
    by_reason: dict[str, int] = {}
    for row in await ledger.denials(since=since):
        by_reason[row.reason] = by_reason.get(row.reason, 0) + row.count
    reasons = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
    return {
        "total": sum(by_reason.values()),
        "reasons": [(_REASONS.get(reason, reason), count) for reason, count in reasons],
    }


async def _top(ledger: Ledger, group: UsageGroup, *, since: datetime) -> list[UsageTotal]:
    totals = await ledger.usage_totals(group_by=(group,), since=since)
    return sorted(totals, key=lambda t: t.cost, reverse=True)[:5]


# -- keys --------------------------------------------------------------------------------


async def _keys_page(
    admin: Admin,
    visit: Visit,
    status_code: int = 200,
    *,
    error: str | None = None,
    created: dict[str, Any] | None = None,
    keep_form: bool = True,
) -> Response:
    keys = await admin.ledger.list_keys()
    budgets = {b.scope: b for b in await admin.ledger.budgets()}
    rows = []
    for k in sorted(keys, key=lambda k: (k.revoked, k.user, k.key_id)):
        last = await admin.ledger.usage(key=k.key_id, limit=1)
        rows.append(
            {
                "record": k,
                "budget": budgets.get(f"key:{k.key_id}"),
                "last_used": last[0].created_at if last else None,
            }
        )
    return admin.render(
        visit,
        "keys.html",
        status_code,
        page="keys",
        rows=rows,
        error=error,
        created=created,
        form=visit.form if error and keep_form else None,
        form_id=secrets.token_urlsafe(16),
        revoked=visit.request.query_params.get("revoked"),
        now=_now(),
    )


async def keys(admin: Admin, visit: Visit) -> Response:
    if visit.request.method == "GET":
        return await _keys_page(admin, visit)
    try:
        fields, limit, period = _new_key(visit.form)
    except ConfigurationError as exc:
        return await _keys_page(admin, visit, 400, error=str(exc))
    # The form's one-time id names the key: sent twice (a reload resends a POST), it finds
    # the key it made instead of making another.
    form_id = _text(visit.form, "form_id")
    if not form_id:
        return await _keys_page(admin, visit, 400, error="Reload the page and try again.")
    key_id = admin.signer.form_key_id(form_id)
    if await _find_key(admin, key_id) is not None:
        message = (
            f"This form was already sent: it created key {key_id}, whose secret was shown "
            "once and cannot be shown again."
        )
        return await _keys_page(admin, visit, 409, error=message, keep_form=False)
    new = generate_key(key_id)
    record = ApiKeyRecord(key_id=new.key_id, key_hash=new.key_hash, prefix=new.prefix, **fields)
    # The budget goes in first: a key must never exist without the cap it was given.
    if limit is not None:
        await admin.ledger.set_budget(f"key:{new.key_id}", limit=limit, period=period)
    await admin.ledger.create_key(record)
    created = {"key": new.key, "key_id": new.key_id, "user": record.user}
    return await _keys_page(admin, visit, created=created)


def _new_key(form: FormData | None) -> tuple[dict[str, Any], Decimal | None, Period]:
    """The fields of the key a create form asks for, its budget and the budget's period."""
    user, team = _text(form, "user"), _text(form, "team") or None
    if not user:
        raise ConfigurationError("a key needs a user")
    validate_scopes([f"user:{user}"])
    if team is not None:
        validate_scopes([f"team:{team}"])
    budget = _text(form, "budget")
    limit = parse_usd(budget) if budget else None
    period = Period.parse(_text(form, "period") or None)
    if period.kind != "none" and limit is None:
        raise ConfigurationError("a period applies to a budget: give the budget too")
    rpm_text = _text(form, "rpm")
    if rpm_text and not (rpm_text.isdigit() and int(rpm_text) > 0):
        raise ConfigurationError(
            f"requests per minute must be a whole number above 0: {rpm_text!r}"
        )
    models = tuple(m for m in _text(form, "models").replace(",", " ").split() if m)
    expires_text = _text(form, "expires")
    expires_at = None
    if expires_text:
        try:
            day = datetime.strptime(expires_text, "%Y-%m-%d").date()
        except ValueError:
            raise ConfigurationError(f"an expiry is a date, YYYY-MM-DD: {expires_text!r}") from None
        expires_at = datetime.combine(day, time(0), tzinfo=timezone.utc)
    fields = {
        "user": user,
        "team": team,
        "rpm": int(rpm_text) if rpm_text else None,
        "allowed_models": models or None,
        "expires_at": expires_at,
    }
    return fields, limit, period


async def _find_key(admin: Admin, key_id: str) -> ApiKeyRecord | None:
    return next((k for k in await admin.ledger.list_keys() if k.key_id == key_id), None)


async def revoke(admin: Admin, visit: Visit) -> Response:
    key_id = str(visit.request.path_params["key_id"])
    if visit.request.method == "POST":
        if await admin.ledger.revoke_key(key_id):
            return admin.redirect(visit.request, "/keys?" + urlencode({"revoked": key_id}))
    else:
        record = await _find_key(admin, key_id)
        if record is not None:
            return admin.render(visit, "revoke.html", page="keys", record=record)
    return admin.render(
        visit, "error.html", 404, page="keys", title="No such key", message=f"No key {key_id}."
    )


# -- budgets -----------------------------------------------------------------------------


async def budgets(admin: Admin, visit: Visit) -> Response:
    request = visit.request
    error = None
    if request.method == "POST":
        try:
            scope, limit, period = _budget_change(visit.form)
        except ConfigurationError as exc:
            error = str(exc)
        else:
            if period is None:  # keep the existing window when only the limit changes
                current = await admin.ledger.status(scope)
                period = current.period if current is not None else Period()
            await admin.ledger.set_budget(scope, limit=limit, period=period)
            return admin.redirect(request, "/budgets?" + urlencode({"set": scope}))
    statuses = await admin.ledger.budgets()
    return admin.render(
        visit,
        "budgets.html",
        400 if error else 200,
        page="budgets",
        budgets=statuses,
        error=error,
        form=visit.form if error else None,
        scope=request.query_params.get("scope", ""),
        changed=request.query_params.get("set"),
        now=_now(),
    )


def _budget_change(form: FormData | None) -> tuple[str, Decimal | None, Period | None]:
    (scope,) = validate_scopes([_text(form, "scope")])
    limit_text = _text(form, "limit")
    if not limit_text:
        raise ConfigurationError("give a limit in USD, or 'none' for no limit")
    limit = None if limit_text.lower() in ("none", "unlimited") else parse_usd(limit_text)
    period_text = _text(form, "period")
    return scope, limit, Period.parse(period_text) if period_text else None


# -- holds -------------------------------------------------------------------------------


async def holds(admin: Admin, visit: Visit) -> Response:
    live = await admin.ledger.holds(live_only=True, limit=1000)
    return admin.render(
        visit,
        "holds.html",
        page="holds",
        holds=live,
        now=_now(),
        swept=visit.request.query_params.get("swept"),
    )


async def sweep(admin: Admin, visit: Visit) -> Response:
    count = await admin.ledger.sweep()
    return admin.redirect(visit.request, f"/holds?swept={count}")


# -- usage -------------------------------------------------------------------------------

#: Rows the usage page lists; the CSV holds up to CSV_ROWS.
PAGE_ROWS, CSV_ROWS = 200, 100_000
CHART_DAYS = 30


async def usage(admin: Admin, visit: Visit) -> Response:
    ledger, params = admin.ledger, visit.request.query_params
    keys = await ledger.list_keys()
    models = await ledger.usage_totals(
        group_by=("model",), since=_now() - timedelta(days=MAX_DAYS)
    )  # the models of the last months, to pick from
    context: dict[str, Any] = {
        "page": "usage",
        "params": params,
        "query": visit.request.url.query,
        "rows": PAGE_ROWS,
        "choices": {
            "users": sorted({k.user for k in keys}),
            "key_ids": sorted(k.key_id for k in keys),
            "models": [t.group[0] for t in models if t.group[0] is not None],
        },
    }
    try:
        query = UsageQuery.from_params(params)
    except ConfigurationError as exc:
        return admin.render(visit, "usage.html", 400, error=str(exc), **context)
    records = await ledger.usage(**query.ledger_filter(), limit=PAGE_ROWS)
    total = next(iter(await ledger.usage_totals(group_by=(), **query.ledger_filter())), None)
    last = query.until or _now().date()
    first = query.since or last - timedelta(days=CHART_DAYS - 1)
    first = max(first, last - timedelta(days=MAX_DAYS - 1))
    per_day = await ledger.usage_totals(
        group_by=("day", "model"), **query.ledger_filter(since=first)
    )
    points = [(d, str(m), t.cost) for t in per_day for d, m in [t.group] if isinstance(d, date)]
    chart = spend_chart(points, first=first, last=last)
    return admin.render(
        visit, "usage.html", error=None, records=records, total=total, chart=chart, **context
    )


async def usage_download(admin: Admin, visit: Visit) -> Response:
    try:
        query = UsageQuery.from_params(visit.request.query_params)
    except ConfigurationError as exc:
        return admin.render(
            visit, "error.html", 400, page="usage", title="Bad filter", message=str(exc)
        )
    records = await admin.ledger.usage(**query.ledger_filter(), limit=CSV_ROWS)
    return Response(
        usage_csv(records),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="gatewaykit-usage.csv"'},
    )


def routes(admin: Admin) -> list[BaseRoute]:
    get, post = ["GET"], ["POST"]
    return [
        Route("/login", admin.page(login, public=True), methods=[*get, *post]),
        Route("/logout", admin.page(logout), methods=post),
        Route("/", admin.page(overview), methods=get),
        Route("/keys", admin.page(keys), methods=[*get, *post]),
        Route("/keys/{key_id}/revoke", admin.page(revoke), methods=[*get, *post]),
        Route("/budgets", admin.page(budgets), methods=[*get, *post]),
        Route("/usage", admin.page(usage), methods=get),
        Route("/usage.csv", admin.page(usage_download), methods=get),
        Route("/holds", admin.page(holds), methods=get),
        Route("/holds/sweep", admin.page(sweep), methods=post),
    ]
