"""``gatewaykit``: the admin command line for a standalone ledger (docs/cli.md).

Every command opens the ledger named by ``--db`` (default ``$GATEWAYKIT_DB``, else
``sqlite:///gatewaykit.db``), does one thing, and closes it. Listings print a readable
table, or JSON with ``--json`` (before or after the subcommand): money as decimal
strings, times as ISO 8601 UTC.

Exit codes: 0 success; 1 ``check`` found invariant violations; 2 a usage or connection
error (bad URL, bad amount, unknown key id, unreachable or foreign database), reported
as one line on stderr without a traceback.

This module and the examples are the only places that read environment variables.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import click

from gatewaykit import __version__
from gatewaykit.csvcells import text_cell
from gatewaykit.errors import GatewayKitError
from gatewaykit.keys import generate_key
from gatewaykit.ledger.base import (
    MAX_LIMIT,
    USAGE_GROUPS,
    ApiKeyRecord,
    BudgetStatus,
    Hold,
    Ledger,
    Period,
    UsageGroup,
    UsageRecord,
    UsageTotal,
    validate_scopes,
)
from gatewaykit.ledger.url import open_ledger
from gatewaykit.money import parse_plain_usd
from gatewaykit.urls import redact

if TYPE_CHECKING:  # serve's imports stay out of the other commands' start-up
    from starlette.applications import Starlette

    from gatewaykit.config import GatewayConfig

__all__ = ["main"]

DEFAULT_DB = "sqlite:///gatewaykit.db"

T = TypeVar("T")


class CliError(click.ClickException):
    """A user's mistake or an unreachable store: one line on stderr, exit code 2."""

    exit_code = 2


# -- helpers ----------------------------------------------------------------------------


def _sqlite_path(url: str) -> Path | None:
    """The file a ``sqlite:///path`` URL names (None for memory or other schemes)."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() != "sqlite" or rest in (":memory:", "/:memory:") or len(rest) < 2:
        return None
    return Path(rest[1:]) if rest.startswith("/") else None


def _run(ctx: click.Context, action: Callable[[Ledger], Awaitable[T]], *, create: bool) -> T:
    """Open the ledger, run ``action`` on it, close it; map errors to exit code 2.

    Read-only commands refuse to create a SQLite file that does not exist, so a typo in
    ``--db`` reports an error instead of listing an empty new database.
    """
    url: str = ctx.obj["db"]
    path = _sqlite_path(url)
    if not create and path is not None and not path.exists():
        raise CliError(
            f"no database at {path} (from --db {url}); create a key first, or pass "
            "--db / set GATEWAYKIT_DB to an existing ledger"
        )

    async def main() -> T:
        ledger = open_ledger(url)
        await ledger.open()
        try:
            return await action(ledger)
        finally:
            await ledger.aclose()

    try:
        return anyio.run(main)
    except GatewayKitError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot open the ledger at {redact(url)}: {exc}") from None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat()


def _money(value: Decimal | None) -> str | None:
    """A decimal string without exponent: 0.000000001, never 1E-9."""
    return None if value is None else f"{value:f}"


def _per(limit: Decimal | None, period: Period) -> str:
    """A budget in words: "$5 per day", "$5 per 3600 seconds", "$5 in total"."""
    cap = "no limit" if limit is None else f"${limit}"
    if period.kind == "none":
        return f"{cap} in total (never resets)"
    if period.kind == "rolling":
        return f"{cap} per {period.seconds} seconds"
    return f"{cap} per {period.kind}"


def _want_json(ctx: click.Context, flag: bool) -> bool:
    return flag or bool(ctx.obj.get("json"))


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, empty: str) -> None:
    if not rows:
        click.echo(empty)
        return
    cells = [[("-" if cell is None else str(cell)) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _amount(text: str, *, what: str) -> Decimal:
    try:
        return parse_plain_usd(text)
    except GatewayKitError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


def _period(text: str | None) -> Period | None:
    if text is None:
        return None
    try:
        return Period.parse(text)
    except GatewayKitError as exc:
        raise click.BadParameter(str(exc), param_hint="--period") from None


def _scope(text: str, *, what: str = "SCOPE") -> str:
    try:
        return validate_scopes([text])[0]
    except GatewayKitError as exc:
        raise click.BadParameter(str(exc), param_hint=what) from None


def _budget_json(status: BudgetStatus) -> dict[str, Any]:
    return {
        "scope": status.scope,
        "limit": _money(status.limit),
        "period": str(status.period),
        "spent": _money(status.spent),
        "held": _money(status.held),
        "remaining": _money(status.remaining),
        "resets_at": _iso(status.resets_at),
    }


def _hold_json(hold: Hold) -> dict[str, Any]:
    return {
        "hold_id": hold.hold_id,
        "scopes": list(hold.scopes),
        "amount": _money(hold.amount),
        "state": hold.state.value,
        "expires_at": _iso(hold.expires_at),
    }


def _usage_json(record: UsageRecord) -> dict[str, Any]:
    return {
        "created_at": _iso(record.created_at),
        "request_id": record.request_id,
        "key_id": record.key_id,
        "user": record.user,
        "model": record.model,
        "endpoint": record.endpoint,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "cache_read_tokens": record.cache_read_tokens,
        "cache_write_tokens": record.cache_write_tokens,
        "cost": _money(record.cost),
        "latency_ms": record.latency_ms,
        "usage_source": record.usage_source,
        "status": record.status,
    }


def _total_json(groups: Sequence[UsageGroup], total: UsageTotal) -> dict[str, Any]:
    values: dict[str, Any] = {
        group: value.isoformat() if isinstance(value, date) else value
        for group, value in zip(groups, total.group, strict=True)
    }
    return {
        **values,
        "requests": total.requests,
        "input_tokens": total.input_tokens,
        "output_tokens": total.output_tokens,
        "cache_read_tokens": total.cache_read_tokens,
        "cache_write_tokens": total.cache_write_tokens,
        "cost": _money(total.cost),
    }


def _emit_csv(rows: Sequence[dict[str, Any]], headers: Sequence[str]) -> None:
    """Text cells defused against formula injection; ``cost`` (a decimal string) is a number."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(headers), lineterminator="\n")
    writer.writeheader()
    writer.writerows(
        {k: v if k == "cost" else text_cell(v) for k, v in row.items()} for row in rows
    )
    click.echo(out.getvalue(), nl=False)


_SPAN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_SPAN_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _moment(ctx: click.Context, param: click.Parameter, text: str | None) -> datetime | None:
    """An ISO 8601 date or date-time (UTC unless it names an offset), or a span ago."""
    if text is None:
        return None
    span = _SPAN.match(text)
    if span:
        seconds = int(span[1]) * _SPAN_UNITS[span[2]]
        try:
            return datetime.now(timezone.utc) - timedelta(seconds=seconds)
        except OverflowError:
            raise click.BadParameter(f"{text!r} reaches before year 1") from None
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither an ISO 8601 date-time (2026-01-15, 2026-01-15T12:00:00Z, "
            "2026-01-15T13:00+01:00) nor a span ago (90s, 30m, 24h, 7d, 2w)"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _key_json(record: ApiKeyRecord) -> dict[str, Any]:
    return {
        "key_id": record.key_id,
        "prefix": record.prefix,
        "user": record.user,
        "revoked": record.revoked,
        "team": record.team,
        "rpm": record.rpm,
        "tpm": record.tpm,
        "max_concurrent": record.max_concurrent,
        "models": None if record.allowed_models is None else list(record.allowed_models),
        "created_at": _iso(record.created_at),
        "expires_at": _iso(record.expires_at),
    }


def _expires(text: str | None, now: datetime) -> datetime | None:
    """``--expires``: a span from now (``90m``, ``12h``, ``30d``, ``2w``) or an ISO 8601
    date or date-time (UTC unless it names an offset)."""
    if text is None:
        return None
    span = _SPAN.match(text)
    if span is not None:
        seconds = int(span[1]) * _SPAN_UNITS[span[2]]
        try:
            when = now.replace(microsecond=0) + timedelta(seconds=seconds)
        except OverflowError:
            raise click.BadParameter(f"{text!r} is too far ahead", param_hint="--expires") from None
    else:
        try:
            when = datetime.fromisoformat(text.strip())
        except ValueError:
            raise click.BadParameter(
                f"{text!r} is neither a span (90m, 12h, 30d, 2w) nor an ISO 8601 date-time "
                "(2027-01-31 or 2027-01-31T18:00:00+01:00)",
                param_hint="--expires",
            ) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
    if when <= now:
        raise click.BadParameter(f"{when.isoformat()} is in the past", param_hint="--expires")
    return when.astimezone(timezone.utc)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
_PER_MINUTE = click.IntRange(min=1, max=2**31 - 1)
_LIMIT = click.IntRange(min=1, max=MAX_LIMIT)  # what the databases' LIMIT takes


def _limit_or_none(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A per-minute limit, or ``none`` to remove it (``keys update``)."""
    if value is None or value.strip().lower() == "none":
        return None
    converted: int = _PER_MINUTE.convert(value, param, ctx)  # type: ignore[arg-type]  # parses str
    return converted


PERIOD_HELP = "Budget window: none, day, week, month (UTC calendar) or a number of seconds."

# -- the command tree --------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db",
    envvar="GATEWAYKIT_DB",
    default=DEFAULT_DB,
    show_default=True,
    metavar="URL",
    help="Ledger URL: sqlite:///path.db or postgresql://user@host/db (env GATEWAYKIT_DB).",
)
@json_option
@click.version_option(__version__, prog_name="gatewaykit")
@click.pass_context
def main(ctx: click.Context, db: str, as_json: bool) -> None:
    """Administer a gatewaykit ledger: API keys, budgets, usage, holds."""
    ctx.ensure_object(dict)
    ctx.obj["db"] = db
    ctx.obj["json"] = as_json


@main.group()
def keys() -> None:
    """Create, list, update and revoke API keys."""


@keys.command("create")
@click.option("--user", required=True, help="The user the key belongs to.")
@click.option("--budget", metavar="USD", help="Give the key its own budget (scope key:<key_id>).")
@click.option("--period", metavar="PERIOD", help=PERIOD_HELP + "  [default: none]")
@click.option("--rpm", type=_PER_MINUTE, help="Requests per minute allowed.")
@click.option("--tpm", type=_PER_MINUTE, help="Tokens per minute allowed (prompt + output).")
@click.option(
    "--max-concurrent", type=_PER_MINUTE, help="Requests the key may have in flight at once."
)
@click.option("--team", help="The key's team: a team:<TEAM> budget then applies too.")
@click.option(
    "--expires",
    metavar="WHEN",
    help="Refuse the key after WHEN: a span (90m, 12h, 30d, 2w) or an ISO 8601 date-time.",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="MODEL",
    help="Allow only this model (repeat for several); default: any model.",
)
@json_option
@click.pass_context
def keys_create(
    ctx: click.Context,
    user: str,
    budget: str | None,
    period: str | None,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    team: str | None,
    expires: str | None,
    models: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create a key for USER and print it once; only its hash is stored."""
    expires_at = _expires(expires, datetime.now(timezone.utc))
    _scope(f"user:{user}", what="--user")  # the key's user is a scope id: no whitespace
    if team is not None:
        _scope(f"team:{team}", what="--team")
    limit = None if budget is None else _amount(budget, what="--budget")
    window = _period(period)
    if window is not None and limit is None:
        raise click.UsageError("--period applies to --budget; give both")
    new = generate_key()
    record = ApiKeyRecord(
        key_id=new.key_id,
        key_hash=new.key_hash,
        prefix=new.prefix,
        user=user,
        team=team,
        rpm=rpm,
        tpm=tpm,
        max_concurrent=max_concurrent,
        allowed_models=tuple(models) or None,
        expires_at=expires_at,
    )

    async def action(ledger: Ledger) -> None:
        # The budget goes in first: a key must never exist without the cap it was given.
        if limit is not None:
            await ledger.set_budget(f"key:{new.key_id}", limit=limit, period=window or Period())
        await ledger.create_key(record)

    _run(ctx, action, create=True)
    if _want_json(ctx, as_json):
        _emit_json(
            {"key": new.key, "key_id": new.key_id, "user": user, "expires_at": _iso(expires_at)}
        )
        return
    click.echo(f"Created key {new.key_id} for user {user}:\n\n    {new.key}\n")
    if expires_at is not None:
        click.echo(f"It expires at {_iso(expires_at)}.")
    if limit is not None:
        click.echo(f"Budget key:{new.key_id}: {_per(limit, window or Period())}.")
    click.echo("Store it now: it is not shown again (the ledger keeps only its hash).")


@keys.command("update")
@click.argument("key_id")
@click.option(
    "--rpm", metavar="N|none", callback=_limit_or_none, help="Requests per minute; none: no limit."
)
@click.option(
    "--tpm", metavar="N|none", callback=_limit_or_none, help="Tokens per minute; none: no limit."
)
@click.option(
    "--max-concurrent",
    metavar="N|none",
    callback=_limit_or_none,
    help="Requests in flight at once; none: no cap.",
)
@json_option
@click.pass_context
def keys_update(
    ctx: click.Context,
    key_id: str,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    as_json: bool,
) -> None:
    """Change the limits of the key KEY_ID; running gateways apply them at once."""
    given = click.core.ParameterSource.COMMANDLINE
    changes = {
        name: value
        for name, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent))
        if ctx.get_parameter_source(name) is given
    }
    if not changes:
        raise click.UsageError("give --rpm, --tpm and/or --max-concurrent")

    async def action(ledger: Ledger) -> ApiKeyRecord | None:
        return await ledger.update_key(key_id, **changes)

    record = _run(ctx, action, create=False)
    if record is None:
        raise CliError(f"no key with id {key_id!r}; `gatewaykit keys list` shows the ids")
    limits = {name: getattr(record, name) for name in ("rpm", "tpm", "max_concurrent")}
    if _want_json(ctx, as_json):
        _emit_json({"key_id": key_id, **limits})
        return
    shown = ", ".join(f"{name} {value or 'unlimited'}" for name, value in limits.items())
    click.echo(f"Key {key_id}: {shown}.")


@keys.command("list")
@click.option("--user", help="Only this user's keys.")
@json_option
@click.pass_context
def keys_list(ctx: click.Context, user: str | None, as_json: bool) -> None:
    """List keys (never the keys themselves, only their prefixes)."""

    async def action(ledger: Ledger) -> list[ApiKeyRecord]:
        return await ledger.list_keys(user=user)

    records = _run(ctx, action, create=False)
    if _want_json(ctx, as_json):
        _emit_json([_key_json(r) for r in records])
        return
    _table(
        [
            "key_id",
            "prefix",
            "user",
            "team",
            "rpm",
            "tpm",
            "max_concurrent",
            "models",
            "created",
            "expires",
            "revoked",
        ],
        [
            [
                r.key_id,
                r.prefix,
                r.user,
                r.team,
                r.rpm,
                r.tpm,
                r.max_concurrent,
                None if r.allowed_models is None else ",".join(r.allowed_models),
                _short_time(r.created_at),
                _short_time(r.expires_at),
                "yes" if r.revoked else "no",
            ]
            for r in records
        ],
        empty="No keys.",
    )


def _short_time(value: datetime | None) -> str | None:
    """A time for a table: UTC to the minute (``--json`` has it in full)."""
    return None if value is None else value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%MZ")


@keys.command("revoke")
@click.argument("key_id")
@json_option
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str, as_json: bool) -> None:
    """Revoke the key KEY_ID; requests with it are refused from now on."""

    async def action(ledger: Ledger) -> bool:
        return await ledger.revoke_key(key_id)

    if not _run(ctx, action, create=False):
        raise CliError(f"no key with id {key_id!r}; `gatewaykit keys list` shows the ids")
    if _want_json(ctx, as_json):
        _emit_json({"key_id": key_id, "revoked": True})
    else:
        click.echo(f"Revoked key {key_id}.")


@main.group()
def budgets() -> None:
    """Set and show budgets (a scope is kind:id, e.g. user:alice, key:<key_id>, team:ml)."""


@budgets.command("set")
@click.argument("scope")
@click.option(
    "--limit", "limit_text", required=True, metavar="USD", help="Limit in USD, or 'none'."
)
@click.option("--period", metavar="PERIOD", help=PERIOD_HELP + "  [default: unchanged, or none]")
@json_option
@click.pass_context
def budgets_set(
    ctx: click.Context, scope: str, limit_text: str, period: str | None, as_json: bool
) -> None:
    """Create or change the budget of SCOPE; it applies to the current window at once."""
    scope = _scope(scope)
    unlimited = limit_text.strip().lower() in ("none", "unlimited")
    limit = None if unlimited else _amount(limit_text, what="--limit")
    window = _period(period)

    async def action(ledger: Ledger) -> BudgetStatus:
        chosen = window
        if chosen is None:  # keep the existing window when only the limit changes
            current = await ledger.status(scope)
            chosen = current.period if current is not None else Period()
        return await ledger.set_budget(scope, limit=limit, period=chosen)

    status = _run(ctx, action, create=True)
    if _want_json(ctx, as_json):
        _emit_json(_budget_json(status))
        return
    click.echo(f"Budget {status.scope}: {_per(status.limit, status.period)}.")


@budgets.command("show")
@click.argument("scope", required=False)
@json_option
@click.pass_context
def budgets_show(ctx: click.Context, scope: str | None, as_json: bool) -> None:
    """Show every budget's current window, or only SCOPE's."""
    wanted = None if scope is None else _scope(scope)

    async def action(ledger: Ledger) -> list[BudgetStatus]:
        if wanted is None:
            return await ledger.budgets()
        status = await ledger.status(wanted)
        if status is None:
            raise CliError(f"the ledger has no budget or spend for {wanted}")
        return [status]

    statuses = _run(ctx, action, create=False)
    if _want_json(ctx, as_json):
        _emit_json([_budget_json(s) for s in statuses])
        return
    _table(
        ["scope", "limit", "period", "spent", "held", "remaining", "resets_at"],
        [
            [
                s.scope,
                "none" if s.limit is None else s.limit,
                s.period,
                s.spent,
                s.held,
                s.remaining,
                _iso(s.resets_at),
            ]
            for s in statuses
        ],
        empty="No budgets.",
    )


_RECORD_FIELDS = (
    "created_at",
    "request_id",
    "key_id",
    "user",
    "model",
    "endpoint",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost",
    "latency_ms",
    "usage_source",
    "status",
)
_TOTAL_FIELDS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost",
)
_RECORD_HEADERS = (
    "time (utc)",
    "request_id",
    "user",
    "key_id",
    "model",
    "in",
    "out",
    "cache_r",
    "cache_w",
    "cost",
    "ms",
    "source",
    "status",
)
TIME_HELP = "an ISO 8601 date or date-time (UTC unless it has an offset) or a span ago: 24h, 7d"


def _group_by(values: tuple[str, ...]) -> tuple[UsageGroup, ...]:
    """``--group-by day --group-by model`` or ``--group-by day,model``."""
    groups = [g.strip().lower() for value in values for g in value.split(",") if g.strip()]
    for group in groups:
        if group not in USAGE_GROUPS:
            raise click.BadParameter(
                f"cannot group by {group!r}; use {', '.join(USAGE_GROUPS)} (several with commas)",
                param_hint="--group-by",
            )
    if len(set(groups)) != len(groups):
        raise click.BadParameter(f"{values!r} names a group twice", param_hint="--group-by")
    return tuple(groups)  # type: ignore[arg-type]


@main.command()
@click.option(
    "--since",
    metavar="TIME",
    callback=_moment,
    help=f"Only requests at or after this time: {TIME_HELP}.",
)
@click.option(
    "--until",
    metavar="TIME",
    callback=_moment,
    help="Only requests before this time (exclusive), in the same forms.",
)
@click.option("--user", help="Only this user's requests.")
@click.option("--key", "key_id", metavar="KEY_ID", help="Only requests made with this API key.")
@click.option("--model", help="Only requests for this model.")
@click.option(
    "--group-by",
    "group_by",
    multiple=True,
    metavar="GROUP",
    help="Sum per user, key, model and/or day (UTC), e.g. --group-by day,model.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    help="Output format  [default: table; json with --json]",
)
@click.option("--limit", type=_LIMIT, help="Most records listed, newest first  [default: 100]")
@json_option
@click.pass_context
def usage(
    ctx: click.Context,
    since: datetime | None,
    until: datetime | None,
    user: str | None,
    key_id: str | None,
    model: str | None,
    group_by: tuple[str, ...],
    fmt: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Usage records, newest first, or their sums with --group-by.

    Rows show the time, latency, tokens, cost, usage source and status of each request.
    --since is inclusive and --until exclusive, so consecutive ranges never overlap.
    """
    if _want_json(ctx, as_json):
        if fmt not in (None, "json"):
            raise click.UsageError(f"--json conflicts with --format {fmt}")
        fmt = "json"
    groups = _group_by(group_by)
    if groups and limit is not None:
        raise click.UsageError("--limit applies to the listing, not to --group-by sums")
    if since is not None and until is not None and since > until:
        raise click.UsageError(
            f"--since {_iso(since)} is after --until {_iso(until)}; nothing lies between"
        )
    filters: dict[str, Any] = {
        "since": since,
        "until": until,
        "user": user,
        "key": key_id,
        "model": model,
    }
    if groups:

        async def totals(ledger: Ledger) -> list[UsageTotal]:
            return await ledger.usage_totals(group_by=groups, **filters)

        _show_totals(groups, _run(ctx, totals, create=False), fmt or "table")
        return

    async def records(ledger: Ledger) -> list[UsageRecord]:
        return await ledger.usage(limit=limit or 100, **filters)

    _show_records(_run(ctx, records, create=False), fmt or "table")


def _show_records(records: list[UsageRecord], fmt: str) -> None:
    if fmt == "json":
        _emit_json([_usage_json(r) for r in records])
    elif fmt == "csv":
        _emit_csv([_usage_json(r) for r in records], _RECORD_FIELDS)
    else:
        _table(
            _RECORD_HEADERS,
            [
                [
                    None if r.created_at is None else f"{r.created_at:%Y-%m-%d %H:%M:%S}",
                    r.request_id,
                    r.user,
                    r.key_id,
                    r.model,
                    r.input_tokens,
                    r.output_tokens,
                    r.cache_read_tokens,
                    r.cache_write_tokens,
                    _money(r.cost),
                    r.latency_ms,
                    r.usage_source,
                    r.status,
                ]
                for r in records
            ],
            empty="No usage recorded.",
        )


def _show_totals(groups: tuple[UsageGroup, ...], totals: list[UsageTotal], fmt: str) -> None:
    rows = [_total_json(groups, t) for t in totals]
    if fmt == "json":
        _emit_json(rows)
    elif fmt == "csv":
        _emit_csv(rows, [*groups, *_TOTAL_FIELDS])
    else:
        headers = [*groups, "requests", "in", "out", "cache_r", "cache_w", "cost"]
        fields = [*groups, *_TOTAL_FIELDS]
        _table(headers, [[row[f] for f in fields] for row in rows], empty="No usage recorded.")


@main.command()
@click.option("--all", "everything", is_flag=True, help="Include settled, released, expired.")
@click.option("--limit", type=_LIMIT, default=1000, show_default=True)
@json_option
@click.pass_context
def holds(ctx: click.Context, everything: bool, limit: int, as_json: bool) -> None:
    """Holds, newest first (only live ones unless --all)."""

    async def action(ledger: Ledger) -> list[Hold]:
        return await ledger.holds(live_only=not everything, limit=limit)

    found = _run(ctx, action, create=False)
    if _want_json(ctx, as_json):
        _emit_json([_hold_json(h) for h in found])
        return
    _table(
        ["hold_id", "scopes", "amount", "state", "expires_at"],
        [
            [h.hold_id, ",".join(h.scopes), h.amount, h.state.value, _iso(h.expires_at)]
            for h in found
        ],
        empty="No live holds." if not everything else "No holds.",
    )


@main.command()
@json_option
@click.pass_context
def sweep(ctx: click.Context, as_json: bool) -> None:
    """Expire every live hold past its TTL, returning its amount to its budgets."""

    async def action(ledger: Ledger) -> int:
        return await ledger.sweep()

    count = _run(ctx, action, create=False)
    if _want_json(ctx, as_json):
        _emit_json({"expired": count})
    else:
        click.echo(f"Expired {count} hold{'s' if count != 1 else ''}.")


@main.command()
@json_option
@click.pass_context
def check(ctx: click.Context, as_json: bool) -> None:
    """Verify the ledger's invariants; exit 1 when any is violated."""

    async def action(ledger: Ledger) -> list[str]:
        return await ledger.check()

    violations = _run(ctx, action, create=False)
    if _want_json(ctx, as_json):
        _emit_json({"ok": not violations, "violations": violations})
    elif violations:
        for violation in violations:
            click.echo(f"VIOLATION: {violation}")
    else:
        click.echo("OK: every invariant holds.")
    if violations:
        ctx.exit(1)


# -- serve -------------------------------------------------------------------------------

#: How ``serve --workers N`` tells its worker processes which file to load.
CONFIG_VARIABLE = "GATEWAYKIT_SERVE_CONFIG"


def _load(path: Path) -> GatewayConfig:
    from gatewaykit.config import load_config

    try:
        return load_config(path, environ=os.environ)
    except GatewayKitError as exc:
        raise CliError(str(exc)) from None


def _worker_app() -> Starlette:
    """The app of one ``serve --workers N`` process, built from the file ``serve`` checked."""
    from gatewaykit.config import load_config
    from gatewaykit.server import build_app

    return build_app(load_config(os.environ[CONFIG_VARIABLE], environ=os.environ))


async def _preflight(config: GatewayConfig) -> None:
    """Open the ledger (or outbox) once before serving, so a bad URL fails here, readably."""
    from gatewaykit.outbox import open_outbox

    platform = config.platform
    if platform is not None:
        async with open_outbox(platform.outbox):
            return
    async with open_ledger(config.ledger.url):
        return


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="gatewaykit.toml",
    show_default=True,
    envvar="GATEWAYKIT_CONFIG",
    help="The TOML configuration file (env GATEWAYKIT_CONFIG).",
)
@click.option("--host", help="Listen on this address  [default: [server] host]")
@click.option("--port", type=click.IntRange(0, 65535), help="[default: [server] port]")
@click.option(
    "--workers", type=click.IntRange(min=1), help="Processes  [default: [server] workers]"
)
@click.option(
    "--check-config",
    is_flag=True,
    help="Validate the file, print the resolved configuration (secrets masked) and exit.",
)
def serve(
    config_path: Path, host: str | None, port: int | None, workers: int | None, check_config: bool
) -> None:
    """Run the gateway under uvicorn, configured by a TOML file (see docs/configuration.md)."""
    config = _load(config_path)
    overrides = {"host": host, "port": port, "workers": workers}
    server = config.server.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    config = config.model_copy(update={"server": server})
    from gatewaykit.server import build_app

    try:
        app = build_app(config)  # reads the price file and checks what the file could not
    except GatewayKitError as exc:
        raise CliError(str(exc)) from None
    for where in config.passwords_in_file():
        click.echo(
            f"warning: {config_path}: {where} holds a password written in the file; "
            "keep it out (docs/configuration.md: passwords)",
            err=True,
        )
    if check_config:
        _emit_json(config.masked())
        return
    try:
        import uvicorn
    except ImportError:
        raise CliError("gatewaykit serve needs uvicorn: pip install 'gatewaykit[serve]'") from None
    try:
        anyio.run(_preflight, config)
    except GatewayKitError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot open the ledger: {exc}") from None
    if server.workers > 1 and config.platform is None and config.ledger.url.startswith("sqlite"):
        click.echo(
            "warning: several workers on one SQLite ledger serialise on its lock; "
            "use PostgreSQL for more than one process",
            err=True,
        )
    plane = config.platform
    mode = f"platform, control plane {redact(plane.url)}" if plane else "standalone"
    click.echo(
        f"gatewaykit serve: {mode}, {server.workers} worker(s), config {config_path}", err=True
    )
    if server.workers == 1:
        uvicorn.run(app, host=server.host, port=server.port, access_log=server.access_log)
        return
    os.environ[CONFIG_VARIABLE] = str(config_path.resolve())
    uvicorn.run(
        "gatewaykit.cli:_worker_app",
        factory=True,
        host=server.host,
        port=server.port,
        workers=server.workers,
        access_log=server.access_log,
    )
