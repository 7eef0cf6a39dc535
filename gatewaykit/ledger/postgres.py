# ruff: noqa: S608  (SQL is assembled from constant fragments only; values are parameters)
"""The scale-out ledger: many gateway processes on many machines share one PostgreSQL.

Every hold operation is one SQL statement (one round trip, one commit) under READ
COMMITTED: a reserve locks its scopes' counter rows in a fixed sorted order, re-checks
``spent + reserved + amount <= limit`` on the locked row versions, and inserts the hold
only if every scope passed. PostgreSQL re-evaluates a waiting row lock against the
newest committed version, so concurrent reserves can neither over-admit nor deadlock,
and no retry loop is needed. Time is the database server's clock, never the
caller's, so skew between gateway hosts does not matter.

Expired holds are reclaimed lazily by the next reserve on one of their scopes, and by
:meth:`PostgresLedger.sweep`, which uses ``FOR UPDATE SKIP LOCKED`` so any number of
instances may sweep at once and each expired hold is released exactly once.

Reserves and settles queued at the same moment in one process for the same budgets are
sent together (one round trip and one commit for the whole group): that keeps a hot
budget's throughput from collapsing as more tasks contend for its row.

asyncpg is imported here only: ``pip install 'gatewaykit[postgres]'``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import anyio
import asyncpg

from gatewaykit.errors import (
    BudgetExceeded,
    ConcurrencyExceeded,
    ConfigurationError,
    GatewayKitError,
    HoldClosedError,
    HoldConflictError,
    HoldNotFoundError,
    LedgerError,
    LedgerUnavailableError,
)
from gatewaykit.ledger._postgres_schema import migrate
from gatewaykit.ledger.base import (
    DENIAL_RETENTION,
    ApiKeyRecord,
    BudgetStatus,
    DenialCount,
    Hold,
    HoldState,
    OutputFit,
    Period,
    ResponseContext,
    UsageFilter,
    UsageGroup,
    UsageRecord,
    UsageTotal,
    sort_totals,
    validate_context_id,
    validate_denial_range,
    validate_denials,
    validate_fit,
    validate_hold_id,
    validate_key_limits,
    validate_limit,
    validate_max_live,
    validate_record,
    validate_scopes,
    validate_ttl,
    validate_usage_filter,
    validate_usage_groups,
    whole_days,
)
from gatewaykit.money import from_nanos, to_nanos
from gatewaykit.resource import AsyncResource
from gatewaykit.urls import redact

__all__ = ["PostgresLedger"]

logger = logging.getLogger("gatewaykit.ledger.postgres")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NO_PERIOD = Period()
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_RETRIES = 5
#: Channel of the api_keys trigger (migration 3); the payload is the ledger's schema.
_KEYS_CHANNEL = "gatewaykit_keys"
#: How often an idle key listener checks that its connection still works (seconds).
_LISTEN_PING = 10.0

# Errors that mean "the store cannot be reached or failed": fail closed.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a connection the server terminated while idle
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)

# -- SQL -------------------------------------------------------------------------------
# A CTE named ``expired`` (scopes, windows, amount) of holds this statement moved out of
# ``held`` is turned into counter releases: lock the rows in sorted order, then update.
# ``(SELECT count(*) FROM x) >= 0`` is a one-time filter: every lock is taken before the
# first row is written.
_RELEASE = """
rel AS (
    SELECT u.scope, u.ws, sum(e.amount)::bigint AS amt, count(*) AS n
    FROM expired e, unnest(e.scopes, e.windows) AS u(scope, ws)
    GROUP BY u.scope, u.ws
),
rel_locked AS (
    SELECT c.scope FROM counters c JOIN rel ON c.scope = rel.scope AND c.window_start = rel.ws
    ORDER BY c.scope, c.window_start FOR UPDATE OF c
),
rel_upd AS (
    UPDATE counters c SET reserved = c.reserved - rel.amt, live = greatest(c.live - rel.n, 0)
    FROM rel
    WHERE c.scope = rel.scope AND c.window_start = rel.ws
      AND (SELECT count(*) FROM rel_locked) >= 0
)"""

# $1 hold id, $2 sorted scopes, $3 amount, $4 ttl. Reclaims due holds on the scopes,
# then admits all-or-none. Returns one row per scope (in $2 order).
_RESERVE_TEMPLATE = """
WITH clock AS (SELECT gk_now() AS t),
fresh AS (SELECT NOT EXISTS (SELECT 1 FROM holds WHERE hold_id = $1) AS yes),
tgt AS (
    SELECT s.scope, s.ord, b.limit_nanos, b.period_kind, b.period_seconds,
           gk_window_start(b.period_kind, b.period_seconds, clock.t) AS ws
    FROM clock CROSS JOIN unnest($2::text[]) WITH ORDINALITY AS s(scope, ord)
    LEFT JOIN budgets b ON b.scope = s.scope
),
due AS (
    SELECT h.hold_id FROM holds h
    WHERE (SELECT yes FROM fresh) AND h.state = 'held'
      AND h.expires_at <= (SELECT t FROM clock) AND h.scopes && $2::text[]
    FOR UPDATE OF h SKIP LOCKED
),
expired AS (
    UPDATE holds h SET state = 'expired', ended_at = clock.t FROM due, clock
    WHERE h.hold_id = due.hold_id
    RETURNING h.scopes, h.windows, h.amount
),
-- Due holds another transaction had locked (SKIP LOCKED passed them by): it is about
-- to release them, so a refusal now may be premature and is retried.
skipped AS (
    SELECT count(*) > (SELECT count(*) FROM due) AS yes FROM holds h
    WHERE (SELECT yes FROM fresh) AND h.state = 'held'
      AND h.expires_at <= (SELECT t FROM clock) AND h.scopes && $2::text[]
),
rel AS (
    SELECT u.scope, u.ws, sum(e.amount)::bigint AS amt, count(*) AS n
    FROM expired e, unnest(e.scopes, e.windows) AS u(scope, ws)
    GROUP BY u.scope, u.ws
),
keys AS (
    SELECT tgt.scope, tgt.ws FROM tgt, fresh WHERE fresh.yes
    UNION
    SELECT rel.scope, rel.ws FROM rel
),
locked AS (
    SELECT c.scope, c.window_start, c.spent, c.reserved
    FROM counters c JOIN keys k ON c.scope = k.scope AND c.window_start = k.ws
    ORDER BY c.scope, c.window_start FOR UPDATE OF c
),
chk AS (
    SELECT t.ord, t.scope, t.ws, t.limit_nanos, t.period_kind, t.period_seconds,
           l.scope IS NOT NULL AS present,
           coalesce(l.spent, 0) AS spent,
           coalesce(l.reserved, 0) - coalesce(r.amt, 0) AS reserved
    FROM tgt t
    LEFT JOIN locked l ON l.scope = t.scope AND l.window_start = t.ws
    LEFT JOIN rel r ON r.scope = t.scope AND r.ws = t.ws
),
{fit}{caps}verdict AS (
    SELECT bool_and(fresh.yes AND c.present AND (c.limit_nanos IS NULL
               OR c.spent::numeric + c.reserved + {amount} <= c.limit_nanos)){crowded} AS admit
    FROM chk c, fresh
),
ins AS (
    INSERT INTO holds (hold_id, scopes, windows, amount, state, created_at, expires_at)
    SELECT $1, $2::text[], (SELECT array_agg(ws ORDER BY ord) FROM tgt), {amount}, 'held',
           clock.t, clock.t + $4::interval
    FROM clock, verdict WHERE verdict.admit
    ON CONFLICT (hold_id) DO NOTHING
    RETURNING created_at, expires_at
),
upd AS (
    UPDATE counters c
    SET reserved = c.reserved - coalesce(r.amt, 0)
            + CASE WHEN t.scope IS NOT NULL AND EXISTS (SELECT 1 FROM ins) THEN {amount} ELSE 0 END,
        live = greatest(c.live - coalesce(r.n, 0), 0)
            + CASE WHEN t.scope IS NOT NULL AND EXISTS (SELECT 1 FROM ins) THEN 1 ELSE 0 END,
        used = c.used OR (t.scope IS NOT NULL AND EXISTS (SELECT 1 FROM ins))
    FROM keys k
    LEFT JOIN rel r ON r.scope = k.scope AND r.ws = k.ws
    LEFT JOIN tgt t ON t.scope = k.scope AND t.ws = k.ws
    WHERE c.scope = k.scope AND c.window_start = k.ws
      AND (SELECT count(*) FROM locked) >= 0
)
SELECT c.scope, c.ws, c.limit_nanos, c.period_kind, c.period_seconds, c.present,
       c.spent, c.reserved, f.yes AS fresh, v.admit, i.created_at, i.expires_at,
       k.yes AS skipped, ({amount})::bigint AS held{crowded_columns}
FROM chk c CROSS JOIN fresh f CROSS JOIN verdict v CROSS JOIN skipped k
LEFT JOIN ins i ON true
ORDER BY c.ord
"""


# A fitted reserve (OutputFit) also takes $5 min tokens, $6 max tokens, $7 base units,
# $8 units per token, $9 units per nano-USD: it holds the full $3 when the tightest
# locked budget has room, else the largest fitting hold (integer division, exact), else
# the smallest (which the verdict then refuses). Mirrors OutputFit.tokens_within.
_FIT = """room AS (
    SELECT min(c.limit_nanos::numeric - c.spent - c.reserved) AS r
    FROM chk c WHERE c.limit_nanos IS NOT NULL
),
fitted AS (
    SELECT CASE WHEN room.r IS NULL OR room.r >= $3 THEN $3::bigint
        ELSE div($7::numeric + $9::numeric - 1 + $8::numeric * greatest($5::bigint, least(
                $6::bigint, CASE WHEN $8::numeric = 0 THEN $6::bigint
                                 ELSE div(room.r * $9::numeric - $7::numeric, $8::numeric) END)),
                 $9::numeric)::bigint
    END AS a FROM room
),
"""
# Caps on live holds ($c1 scopes, $c2 caps: the two parameters after the fit's): each
# capped scope's live holds in all its windows, less those this statement reclaims. The
# rows are read, not locked: the caller serialises capped reserves of a scope with an
# advisory lock taken before this statement, whose snapshot then sees every one of them.
_CAPS = """caps AS (
    SELECT m.scope, m.most,
           (SELECT coalesce(sum(c.live), 0) FROM counters c WHERE c.scope = m.scope)
           - (SELECT count(*) FROM expired e WHERE m.scope = ANY(e.scopes)) AS live
    FROM unnest($c1::text[], $c2::int[]) AS m(scope, most)
),
crowded AS (SELECT * FROM caps WHERE live >= most ORDER BY scope LIMIT 1),
"""
_CROWDED_COLUMNS = """,
       (SELECT scope FROM crowded) AS crowded_scope, (SELECT most FROM crowded) AS crowded_most,
       (SELECT live FROM crowded) AS crowded_live"""


@functools.cache
def _reserve_sql(*, fit: bool, caps: bool) -> str:
    sql = _RESERVE_TEMPLATE.format(
        fit=_FIT if fit else "",
        amount="(SELECT a FROM fitted)" if fit else "$3",
        caps=_CAPS if caps else "",
        crowded=" AND NOT EXISTS (SELECT 1 FROM crowded)" if caps else "",
        crowded_columns=_CROWDED_COLUMNS if caps else "",
    )
    first = 10 if fit else 5
    return sql.replace("$c1", f"${first}").replace("$c2", f"${first + 1}")


_RESERVE = _reserve_sql(fit=False, caps=False)
_RESERVE_FIT = _reserve_sql(fit=True, caps=False)

# Create the counter rows a reserve needs, sorted so concurrent inserters never deadlock.
_ENSURE_COUNTERS = """
INSERT INTO counters (scope, window_start)
SELECT k.scope, k.ws FROM unnest($1::text[], $2::timestamptz[]) AS k(scope, ws)
ORDER BY k.scope, k.ws
ON CONFLICT (scope, window_start) DO NOTHING
"""

_HOLD_COLUMNS = "hold_id, scopes, amount, state, created_at, expires_at, charged, late"

# $1 hold id: expire the hold if it is live and due ("touch"); return it as it is now.
_TOUCH = f"""
WITH clock AS (SELECT gk_now() AS t),
h AS (SELECT {_HOLD_COLUMNS} FROM holds WHERE hold_id = $1 FOR UPDATE),
expired AS (
    UPDATE holds x SET state = 'expired', ended_at = clock.t FROM h, clock
    WHERE x.hold_id = h.hold_id AND h.state = 'held' AND h.expires_at <= clock.t
    RETURNING x.scopes, x.windows, x.amount
),
{_RELEASE}
SELECT h.*, (SELECT count(*) FROM expired) AS expired_now FROM h
"""

_RECORD_INSERT = """
rec AS (
    INSERT INTO usage_records (request_id, key_id, user_id, model, endpoint, status,
        usage_source, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
        cost_nanos, error, latency_ms, created_at)
    SELECT r.*, clock.t FROM clock, unnest(
        $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[],
        $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[],
        $15::text[], $16::bigint[]) AS r
    WHERE {when}
    ON CONFLICT (request_id) DO NOTHING
)"""

# $1 hold id, $2 actual, $3..$16 the usage record as one-element arrays (or empty).
_SETTLE = f"""
WITH clock AS (SELECT gk_now() AS t),
h AS (SELECT {_HOLD_COLUMNS} FROM holds WHERE hold_id = $1 FOR UPDATE),
claim AS (
    UPDATE holds x SET state = 'settled', charged = $2,
        late = (h.state = 'expired' OR h.expires_at <= clock.t),
        ended_at = CASE WHEN h.state = 'held' THEN clock.t ELSE x.ended_at END
    FROM h, clock
    WHERE x.hold_id = h.hold_id AND h.state IN ('held', 'expired')
    RETURNING x.scopes, x.windows, x.amount, x.late, h.state AS was
),
delta AS (
    SELECT u.scope, u.ws, CASE WHEN c.was = 'held' THEN c.amount ELSE 0 END AS rel,
           CASE WHEN c.was = 'held' THEN 1 ELSE 0 END AS n
    FROM claim c, unnest(c.scopes, c.windows) AS u(scope, ws)
),
locked AS (
    SELECT c.scope FROM counters c JOIN delta d ON c.scope = d.scope AND c.window_start = d.ws
    ORDER BY c.scope, c.window_start FOR UPDATE OF c
),
upd AS (
    UPDATE counters c SET reserved = c.reserved - d.rel, live = greatest(c.live - d.n, 0),
        spent = c.spent + $2 FROM delta d
    WHERE c.scope = d.scope AND c.window_start = d.ws AND (SELECT count(*) FROM locked) >= 0
),
{_RECORD_INSERT.format(when="EXISTS (SELECT 1 FROM claim)")}
SELECT h.*, c.late AS new_late, c.was
FROM (SELECT 1) one LEFT JOIN h ON true LEFT JOIN claim c ON true
"""

_STATEMENTS = {"reserve": _RESERVE, "reserve_fit": _RESERVE_FIT, "settle": _SETTLE}

_RELEASE_RECORD = _RECORD_INSERT.format(
    when="EXISTS (SELECT 1 FROM claim WHERE state = 'released') OR EXISTS (SELECT 1 FROM tomb)"
)

# $1 hold id, $2 true (leave a tombstone for an unknown id), $3..$16 the record.
_RELEASE_HOLD = f"""
WITH clock AS (SELECT gk_now() AS t),
h AS (SELECT {_HOLD_COLUMNS} FROM holds WHERE hold_id = $1 FOR UPDATE),
claim AS (
    UPDATE holds x
    SET state = CASE WHEN h.expires_at <= clock.t THEN 'expired' ELSE 'released' END,
        ended_at = clock.t
    FROM h, clock
    WHERE x.hold_id = h.hold_id AND h.state = 'held'
    RETURNING x.scopes, x.windows, x.amount, x.state
),
expired AS (SELECT scopes, windows, amount FROM claim),
{_RELEASE},
tomb AS (
    INSERT INTO holds (hold_id, scopes, windows, amount, state, created_at, expires_at,
                       ended_at)
    SELECT $1, '{{}}', '{{}}', 0, 'released', clock.t, clock.t, clock.t
    FROM clock WHERE NOT EXISTS (SELECT 1 FROM h) AND $2::bool
    ON CONFLICT (hold_id) DO NOTHING
    RETURNING created_at
),
{_RELEASE_RECORD}
SELECT h.*, c.state AS new_state, t.created_at AS tomb_at
FROM (SELECT 1) one
LEFT JOIN h ON true LEFT JOIN claim c ON true LEFT JOIN tomb t ON true
"""

# $1 hold id, $2 ttl.
_EXTEND = f"""
WITH clock AS (SELECT gk_now() AS t),
h AS (SELECT {_HOLD_COLUMNS} FROM holds WHERE hold_id = $1 FOR UPDATE),
ext AS (
    UPDATE holds x SET expires_at = greatest(h.expires_at, clock.t + $2::interval)
    FROM h, clock
    WHERE x.hold_id = h.hold_id AND h.state = 'held' AND h.expires_at > clock.t
    RETURNING x.expires_at
),
expired AS (
    UPDATE holds x SET state = 'expired', ended_at = clock.t FROM h, clock
    WHERE x.hold_id = h.hold_id AND h.state = 'held' AND h.expires_at <= clock.t
    RETURNING x.scopes, x.windows, x.amount
),
{_RELEASE}
SELECT h.*, (SELECT expires_at FROM ext) AS new_expires,
       (SELECT count(*) FROM expired) AS expired_now
FROM h
"""

# $1 batch size. SKIP LOCKED: concurrent sweepers split the due holds between them.
_SWEEP = f"""
WITH clock AS (SELECT gk_now() AS t),
due AS (
    SELECT h.hold_id FROM holds h
    WHERE h.state = 'held' AND h.expires_at <= (SELECT t FROM clock)
    ORDER BY h.expires_at LIMIT $1
    FOR UPDATE OF h SKIP LOCKED
),
expired AS (
    UPDATE holds x SET state = 'expired', ended_at = clock.t FROM due, clock
    WHERE x.hold_id = due.hold_id
    RETURNING x.scopes, x.windows, x.amount
),
{_RELEASE}
SELECT (SELECT count(*) FROM expired) AS expired
"""

_STATUS_ROWS = """
WITH clock AS (SELECT gk_now() AS t),
s AS ({scopes})
SELECT s.scope, clock.t, b.scope IS NOT NULL AS has_budget, b.limit_nanos, b.period_kind,
       b.period_seconds, c.spent, c.reserved,
       EXISTS (SELECT 1 FROM counters k WHERE k.scope = s.scope AND k.used) AS counted
FROM s CROSS JOIN clock
LEFT JOIN budgets b ON b.scope = s.scope
LEFT JOIN counters c ON c.scope = s.scope
    AND c.window_start = gk_window_start(b.period_kind, b.period_seconds, clock.t)
"""
_STATUS_ONE = _STATUS_ROWS.format(scopes="SELECT $1::text AS scope")
_STATUS_ALL = _STATUS_ROWS.format(
    scopes="SELECT scope FROM budgets UNION SELECT DISTINCT scope FROM counters WHERE used"
)

_CHECK_COUNTERS = """
WITH per AS (
    SELECT u.scope, u.ws,
           sum(CASE WHEN h.state = 'held' THEN h.amount ELSE 0 END) AS live,
           sum(CASE WHEN h.state = 'settled' THEN h.charged ELSE 0 END) AS charged,
           count(*) FILTER (WHERE h.state = 'held') AS holds
    FROM holds h, unnest(h.scopes, h.windows) AS u(scope, ws)
    GROUP BY u.scope, u.ws
)
SELECT coalesce(c.scope, p.scope) AS scope, coalesce(c.window_start, p.ws) AS ws,
       c.scope IS NOT NULL AS present, c.spent, c.reserved, c.live AS counted,
       coalesce(p.live, 0) AS live, coalesce(p.charged, 0) AS charged,
       coalesce(p.holds, 0) AS holds
FROM counters c FULL JOIN per p ON p.scope = c.scope AND p.ws = c.window_start
WHERE c.scope IS NULL OR c.spent < 0 OR c.reserved < 0
   OR c.reserved != coalesce(p.live, 0) OR c.spent != coalesce(p.charged, 0)
   OR c.live != coalesce(p.holds, 0)
ORDER BY 1, 2
"""

_CHECK_HOLDS = {
    "I4: {} holds carry a charge or late mark without being settled": (
        "SELECT count(*) FROM holds WHERE state != 'settled' AND (charged != 0 OR late)"
    ),
    "I6: {} holds expired before their TTL": (
        "SELECT count(*) FROM holds WHERE state = 'expired' "
        "AND (ended_at IS NULL OR ended_at < expires_at)"
    ),
    "I8: {} holds do not cover exactly their scopes": (
        "SELECT count(*) FROM holds WHERE cardinality(scopes) != cardinality(windows) "
        "OR (state != 'released' AND cardinality(scopes) = 0)"
    ),
    "I11: {} money columns are not integers": (
        "SELECT count(*) FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND ((table_name = 'counters' AND column_name IN ('spent', 'reserved')) "
        "OR (table_name = 'holds' AND column_name IN ('amount', 'charged'))) "
        "AND data_type != 'bigint'"
    ),
}

# $1 ids, $2 owner, $3 tokens, $4 growth, $5 ttl. A live row of the same id and owner
# grows: max(stored + growth, tokens), under its row lock; an expired one is replaced.
_CONTEXT_UPSERT = """
WITH clock AS (SELECT gk_now() AS t)
INSERT INTO response_contexts (context_id, owner, tokens, updated_at, expires_at)
SELECT id, $2, $3, clock.t, clock.t + $5::interval FROM clock, unnest($1::text[]) AS id
ON CONFLICT (context_id, owner) DO UPDATE SET
    tokens = least(greatest(CASE WHEN response_contexts.expires_at > excluded.updated_at
                                 THEN response_contexts.tokens + $4 ELSE 0 END,
                            excluded.tokens),
                   9007199254740991),
    updated_at = excluded.updated_at,
    expires_at = excluded.expires_at
"""

_CONTEXT_READ = """
SELECT tokens FROM response_contexts
WHERE context_id = $1 AND owner = $2 AND expires_at > gk_now()
"""

# $1 hours, $2 reasons, $3 counts, sorted (so concurrent flushes lock rows in one order).
_DENIALS_ADD = """
INSERT INTO denials (hour, reason, count)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::bigint[])
ON CONFLICT (hour, reason) DO UPDATE SET count = denials.count + excluded.count
"""
_DENIALS_READ = """
SELECT hour, reason, count FROM denials
WHERE hour >= $1 AND ($2::timestamptz IS NULL OR hour < $2) ORDER BY hour, reason
"""
_DENIALS_PRUNE = f"""
DELETE FROM denials WHERE hour < gk_now() - interval '{DENIAL_RETENTION} seconds'
"""

# $1 batch size. SKIP LOCKED: a row being refreshed (or pruned elsewhere) is left alone.
_CONTEXT_PRUNE = """
WITH due AS (
    SELECT context_id, owner FROM response_contexts
    WHERE expires_at <= gk_now() LIMIT $1 FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM response_contexts r USING due
    WHERE r.context_id = due.context_id AND r.owner = due.owner
    RETURNING 1
)
SELECT count(*) AS pruned FROM gone
"""

_KEY_COLUMNS = (
    "key_id, key_hash, prefix, user_id, team, revoked, created_at, expires_at, allowed_models, "
    "rpm, max_concurrent, tpm"
)
_USAGE_COLUMNS = (
    "request_id, key_id, user_id, model, endpoint, status, usage_source, input_tokens, "
    "output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos, error, latency_ms, "
    "created_at"
)

_ROLLUP_SUMS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_nanos",
)
_DAILY_COLUMNS = f"day, user_id, key_id, model, {', '.join(_ROLLUP_SUMS)}"
#: A usage record as a row of usage_daily (the parts ``usage_totals`` sums).
_RECORD_AS_DAILY = (
    "(created_at AT TIME ZONE 'UTC')::date AS day, user_id, key_id, model, 1::bigint AS "
    "requests, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_nanos"
)
_RECORD_SUMS = ", ".join(["count(*)", *(f"sum({c})" for c in _ROLLUP_SUMS[1:])])
#: The SQL of each ``usage_totals`` group over those parts.
_USAGE_GROUP_SQL: dict[str, str] = {
    "user": "user_id",
    "key": "key_id",
    "model": "model",
    "day": "day",
}
_USAGE_SUMS = ", ".join(f"sum({c}) AS {c}" for c in _ROLLUP_SUMS)
#: Seq values folded into the rollup per statement (a sweep runs as many as it needs);
#: each statement takes about a second per 50,000 records of new groups.
_ROLLUP_BATCH = 50_000
#: How long the rollup waits for transactions still writing usage records (ms); past
#: it, the sweep leaves the rollup for the next one rather than hold up settles longer.
_ROLLUP_LOCK_WAIT_MS = 100

# The rollup's safe bound: once a SHARE lock on usage_records is granted, no transaction
# that inserted a record is still open, so every seq up to max(seq) is committed (or was
# aborted), and a record inserted later draws a larger seq (the sequence is not cached
# per session). The lock is released at once; the folding runs without it.
_ROLLUP_BOUND = "LOCK TABLE usage_records IN SHARE MODE"

# $1 safe bound, $2 batch. Folds the records past the watermark, up to the bound, into
# usage_daily and moves the watermark, in one statement. A rollup already running in
# another transaction (another instance's sweep) makes this one do nothing.
_ROLLUP = f"""
WITH mark AS (SELECT seq FROM usage_rollup FOR UPDATE SKIP LOCKED),
span AS (SELECT seq AS lo, least($1::bigint, seq + $2::bigint) AS hi FROM mark
         WHERE seq < $1::bigint),
agg AS (
    SELECT (r.created_at AT TIME ZONE 'UTC')::date AS day, r.user_id, r.key_id, r.model,
           {_RECORD_SUMS}
    FROM span, usage_records r WHERE r.seq > span.lo AND r.seq <= span.hi
    GROUP BY 1, 2, 3, 4
),
merged AS (
    INSERT INTO usage_daily AS d ({_DAILY_COLUMNS}) SELECT * FROM agg
    ON CONFLICT (day, model, coalesce(user_id, ''), (user_id IS NULL), coalesce(key_id, ''),
                 (key_id IS NULL))
    DO UPDATE SET {", ".join(f"{c} = d.{c} + excluded.{c}" for c in _ROLLUP_SUMS)}
)
UPDATE usage_rollup u SET seq = span.hi FROM span RETURNING span.hi - span.lo AS moved
"""

# (day, user, key, model) groups whose usage_daily sums differ from their records.
# Yesterday and today (UTC) only: check() stays cheap on a ledger of millions of records.
_CHECK_ROLLUP = f"""
WITH since AS (SELECT (gk_now() AT TIME ZONE 'UTC')::date - 1 AS day),
raw AS (
    SELECT (created_at AT TIME ZONE 'UTC')::date, user_id, key_id, model, {_RECORD_SUMS}
    FROM usage_records WHERE seq <= (SELECT seq FROM usage_rollup)
    AND created_at >= (SELECT day FROM since)::timestamp AT TIME ZONE 'UTC'
    GROUP BY 1, 2, 3, 4
),
daily AS (SELECT {_DAILY_COLUMNS} FROM usage_daily WHERE day >= (SELECT day FROM since))
SELECT count(*) FROM ((SELECT * FROM raw EXCEPT SELECT * FROM daily)
    UNION ALL (SELECT * FROM daily EXCEPT SELECT * FROM raw)) x
"""


def _usage_where(
    query: UsageFilter, args: list[Any], *bounds: tuple[str, datetime | date | int | None]
) -> str:
    """The WHERE clause of ``query``'s filters, appending its parameters to ``args``; time
    bounds as ``bounds`` if given, else ``query``'s."""
    if not bounds:
        bounds = (("created_at >=", query.since), ("created_at <", query.until))
    terms: list[str] = []
    for column, value in (
        *bounds,
        ("user_id =", query.user),
        ("key_id =", query.key),
        ("model =", query.model),
    ):
        if value is not None:
            args.append(value)
            terms.append(f"{column} ${len(args)}")
    return "WHERE " + " AND ".join(terms) + " " if terms else ""


def _midnight(day: date | None) -> datetime | None:
    return None if day is None else datetime(day.year, day.month, day.day, tzinfo=timezone.utc)


def _usage_parts(query: UsageFilter, mark: int, args: list[Any]) -> list[str]:
    """SELECTs of usage_daily rows whose sums are the totals of ``query``'s records.

    Whole days come from usage_daily plus the records past its watermark ``mark``; the
    partial days at the range's edges from the records.
    """
    days = whole_days(query)
    records = f"SELECT {_RECORD_AS_DAILY} FROM usage_records "
    if days is None:
        return [records + _usage_where(query, args)]
    first, end = days
    first_at, end_at = _midnight(first), _midnight(end)
    parts = [
        f"SELECT {_DAILY_COLUMNS} FROM usage_daily "
        + _usage_where(query, args, ("day >=", first), ("day <", end)),
        records
        + _usage_where(
            query, args, ("seq >", mark), ("created_at >=", first_at), ("created_at <", end_at)
        ),
    ]
    if query.since is not None and first_at is not None and query.since < first_at:
        parts.append(
            records
            + _usage_where(query, args, ("created_at >=", query.since), ("created_at <", first_at))
        )
    if query.until is not None and end_at is not None and end_at < query.until:
        parts.append(
            records
            + _usage_where(query, args, ("created_at >=", end_at), ("created_at <", query.until))
        )
    return parts


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _hold(row: Any, **changes: Any) -> Hold:
    """A :class:`Hold` from a row with the ``_HOLD_COLUMNS`` (and optional overrides)."""
    values = {
        k: row[k]
        for k in (
            "hold_id",
            "scopes",
            "amount",
            "state",
            "created_at",
            "expires_at",
            "charged",
            "late",
        )
    }
    values.update(changes)
    amount, charged = values["amount"], values["charged"]
    return Hold(
        hold_id=values["hold_id"],
        scopes=tuple(values["scopes"]),
        amount=from_nanos(amount),
        state=HoldState(values["state"]),
        created_at=values["created_at"],
        expires_at=values["expires_at"],
        charged=from_nanos(charged),
        overrun=from_nanos(max(0, charged - amount)),
        late=bool(values["late"]),
    )


def _period(kind: str | None, seconds: int | None) -> Period:
    if kind is None or kind == "none":
        return _NO_PERIOD
    return Period(kind, None if seconds is None else int(seconds))  # type: ignore[arg-type]


def _record_args(record: UsageRecord | None) -> list[list[Any]]:
    """A usage record as 14 one-element arrays (``unnest`` turns them into one row)."""
    if record is None:
        return [[] for _ in range(14)]
    values = (
        record.request_id,
        record.key_id,
        record.user,
        record.model,
        record.endpoint,
        record.status,
        record.usage_source,
        record.input_tokens,
        record.output_tokens,
        record.cache_read_tokens,
        record.cache_write_tokens,
        to_nanos(record.cost),
        record.error,
        record.latency_ms,
    )
    return [[v] for v in values]


def _check_record(record: UsageRecord | None) -> None:
    """Refuse a record no column can hold before it joins a group of statements."""
    if validate_record(record) is not None:
        assert record is not None
        to_nanos(record.cost)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _key(r: Any) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=r["key_id"],
        key_hash=r["key_hash"],
        prefix=r["prefix"],
        user=r["user_id"],
        team=r["team"],
        revoked=r["revoked"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        allowed_models=None if r["allowed_models"] is None else tuple(r["allowed_models"]),
        rpm=r["rpm"],
        max_concurrent=r["max_concurrent"],
        tpm=r["tpm"],
    )


@dataclasses.dataclass(eq=False)
class _Op:
    """One queued reserve or settle waiting for its group's round trip."""

    args: tuple[Any, ...]
    done: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    row: list[Any] | None = None
    error: BaseException | None = None
    lead: bool = False


class PostgresLedger(AsyncResource):
    """A budget ledger in PostgreSQL, shared safely by any number of gateway processes.

    ``url`` is a libpq URL (``postgresql://user:pass@host:5432/dbname``). The tables live
    in ``schema`` (created on open, migrated by version); it may also be given in the URL
    as ``?schema=name``, so ``open_ledger`` and the command line can reach it. Default
    ``public``. ``pool_min``/``pool_max`` size
    the connection pool of *this* process: the total over all instances must stay below
    the server's ``max_connections``. ``command_timeout`` bounds every statement and
    ``connect_timeout`` every connection attempt; past either, or whenever the server is
    unreachable, operations raise :class:`~gatewaykit.errors.LedgerUnavailableError`
    (fail closed). ``report_timeout`` replaces ``command_timeout`` for ``usage`` and
    ``usage_totals``, which may read millions of rows, for each step of the usage rollup
    ``sweep`` runs, and for each schema migration (migration 7 sums every usage record).

    ``batch_max`` caps how many queued reserves (or settles) on the same budgets one
    round trip carries; ``batch_max=1`` turns the combiner off.

    ``clock`` is for tests only: it replaces the database clock (seconds since the
    epoch) for this ledger's own statements. Production leaves it unset, so every
    instance shares the database server's clock.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        pool_min: int = 1,
        pool_max: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 10.0,
        report_timeout: float = 120.0,
        sweep_batch: int = 1000,
        batch_max: int = 64,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("postgresql://", "postgres://")):
            raise ConfigurationError(
                "PostgresLedger needs a postgresql://user@host/dbname URL, got "
                f"{redact(url) if isinstance(url, str) else url!r}"
            )
        url, url_schema = _split_schema(url)
        schema = schema if schema is not None else url_schema or "public"
        if not isinstance(schema, str) or not _SCHEMA_NAME.match(schema):
            raise ConfigurationError(
                f"schema must be a plain SQL identifier (letters, digits, _), got {schema!r}"
            )
        for name, value in (
            ("pool_min", pool_min),
            ("pool_max", pool_max),
            ("sweep_batch", sweep_batch),
            ("batch_max", batch_max),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be a non-negative int, got {value!r}")
        if pool_max < 1 or pool_min > pool_max:
            raise ConfigurationError(
                f"need 0 <= pool_min <= pool_max and pool_max >= 1, got {pool_min}..{pool_max}"
            )
        if sweep_batch < 1 or batch_max < 1:
            raise ConfigurationError("sweep_batch and batch_max must be at least 1")
        self.url = url
        self.schema = schema
        self.pool_min = pool_min
        self.pool_max = pool_max
        self.connect_timeout = _positive("connect_timeout", connect_timeout)
        self.command_timeout = _positive("command_timeout", command_timeout)
        self.report_timeout = _positive("report_timeout", report_timeout)
        self.sweep_batch = sweep_batch
        self.batch_max = batch_max
        self.clock = clock
        self._pool: Any = None
        # The combiner: ops queued per (statement, scopes); at most two groups in flight.
        self._queues: dict[tuple[str, tuple[str, ...]], collections.deque[_Op]] = {}
        self._inflight: dict[tuple[str, tuple[str, ...]], int] = {}
        # Scopes of holds this process reserved, so their settles can be grouped too.
        self._hold_scopes: collections.OrderedDict[str, tuple[str, ...]] = collections.OrderedDict()
        self._key_epoch = 0
        self._listener: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"PostgresLedger({redact(self.url)!r}, schema={self.schema!r})"

    # -- key change notifications ------------------------------------------------------
    @property
    def key_epoch(self) -> int:
        """Increases whenever this ledger learns that an API key changed.

        Its own ``create_key``/``revoke_key`` count before they return. Any other change
        (the CLI, another instance, SQL by hand) arrives by ``LISTEN gatewaykit_keys`` on
        one dedicated connection, opened on the first read of this property from the
        event loop — so short-lived users such as the CLI never open it. While that
        connection is down nothing arrives; the epoch is bumped again on reconnection.
        """
        if self._listener is None and self._pool is not None:
            with contextlib.suppress(RuntimeError):  # read outside a running loop
                self._listener = asyncio.get_running_loop().create_task(
                    self._listen(), name="gatewaykit-postgres-key-listener"
                )
        return self._key_epoch

    def _on_keys(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if payload == self.schema:
            self._key_epoch += 1

    async def _listen(self) -> None:
        """Keep a LISTEN connection for as long as the ledger is open; reconnect on loss."""
        delay = 0.1
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(
                    self.url,
                    timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    server_settings={"application_name": f"gatewaykit-keys:{self.schema}"[:63]},
                )
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_event, lost))
                await conn.add_listener(_KEYS_CHANNEL, self._on_keys)
                self._key_epoch += 1  # whatever changed while nobody listened
                delay = 0.1
                while not lost.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(lost.wait(), _LISTEN_PING)
                    if not lost.is_set():
                        await conn.execute("SELECT 1")  # a silently dead link shows here
                logger.warning("key change listener lost its connection; reconnecting")
            except Exception as exc:
                logger.warning(
                    "key change listener cannot listen on %s (%s); cached API keys fall "
                    "back to key_cache_ttl until it can; retrying in %.1fs",
                    redact(self.url),
                    type(exc).__name__,
                    delay,
                )
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- lifecycle ---------------------------------------------------------------------
    async def open(self) -> None:
        """Connect the pool and migrate the schema; idempotent."""
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.url,
                min_size=self.pool_min,
                max_size=self.pool_max,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                reset=_keep_session,
                server_settings={
                    "search_path": self.schema,
                    "default_transaction_isolation": "read committed",
                    "application_name": "gatewaykit",
                    "jit": "off",
                    # Every statement is a few primary-key lookups: plan once per
                    # connection, not on every execution.
                    "plan_cache_mode": "force_generic_plan",
                },
            )
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from None
        try:
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                await migrate(conn, self.schema, timeout=self.report_timeout)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _UNAVAILABLE):
                raise self._unavailable(exc) from None
            raise
        self._pool = pool

    async def aclose(self) -> None:
        """Close the pool (waits for operations in flight); idempotent."""
        pool, self._pool = self._pool, None
        listener, self._listener = self._listener, None
        with anyio.CancelScope(shield=True):
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            if pool is not None:
                await pool.close()

    def _unavailable(self, exc: BaseException) -> LedgerUnavailableError:
        detail = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        return LedgerUnavailableError(
            f"the PostgreSQL ledger at {redact(self.url)} is unavailable ({detail})"
        )

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection (with the test clock pinned); store errors fail closed."""
        pool = self._pool
        if pool is None:
            raise LedgerUnavailableError(
                "the PostgreSQL ledger is not open; use 'async with ledger' or "
                "'await ledger.open()'"
            )
        try:
            async with pool.acquire(timeout=self.connect_timeout) as conn:
                if self.clock is not None:
                    now = _EPOCH + timedelta(microseconds=_us(self.clock()))
                    await conn.execute(
                        "SELECT set_config('gatewaykit.now', $1, false)", now.isoformat()
                    )
                yield conn
        except GatewayKitError:
            raise
        except asyncpg.DataError as exc:  # a value out of range: retrying cannot help
            raise LedgerError(f"the PostgreSQL ledger refused a value: {exc}") from exc
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from exc

    async def _fetch(self, sql: str, *args: Any, report: bool = False) -> list[Any]:
        """Run one statement (its own transaction); retry the rare deadlock.

        A ``report`` (a usage listing or total) is bounded by ``report_timeout``.
        """
        timeout = self.report_timeout if report else None  # None: command_timeout
        for attempt in range(_RETRIES):
            try:
                async with self._conn() as conn:
                    return list(await conn.fetch(sql, *args, timeout=timeout))
            except LedgerUnavailableError as exc:
                if not _deadlock(exc) or attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    # -- budgets -----------------------------------------------------------------------
    async def set_budget(
        self, scope: str, *, limit: Decimal | None, period: Period = _NO_PERIOD
    ) -> BudgetStatus:
        """Create or change a budget; it applies to the current window at once."""
        (scope,) = validate_scopes([scope])
        if not isinstance(period, Period):
            period = Period.parse(period)
        nanos = None if limit is None else to_nanos(limit)
        await self._fetch(
            "INSERT INTO budgets (scope, limit_nanos, period_kind, period_seconds, updated_at) "
            "VALUES ($1, $2, $3, $4, gk_now()) ON CONFLICT (scope) DO UPDATE SET "
            "limit_nanos = EXCLUDED.limit_nanos, period_kind = EXCLUDED.period_kind, "
            "period_seconds = EXCLUDED.period_seconds, updated_at = EXCLUDED.updated_at",
            scope,
            nanos,
            period.kind,
            period.seconds,
        )
        status = await self.status(scope)
        assert status is not None
        return status

    async def delete_budget(self, scope: str) -> bool:
        """Remove a budget's limit; counters and history stay. False if there was none."""
        (scope,) = validate_scopes([scope])
        rows = await self._fetch("DELETE FROM budgets WHERE scope = $1 RETURNING 1", scope)
        return bool(rows)

    async def status(self, scope: str) -> BudgetStatus | None:
        """The scope's current window, or None if the ledger never saw the scope."""
        (scope,) = validate_scopes([scope])
        rows = await self._fetch(_STATUS_ONE, scope)
        row = rows[0]
        if not (row["has_budget"] or row["counted"]):
            return None
        return _status(row)

    async def budgets(self) -> list[BudgetStatus]:
        """Every known scope's current window, sorted by scope."""
        rows = await self._fetch(_STATUS_ALL)
        return sorted((_status(r) for r in rows), key=lambda s: s.scope)

    # -- holds -------------------------------------------------------------------------
    async def reserve(
        self,
        hold_id: str,
        scopes: Sequence[str],
        amount: Decimal,
        *,
        ttl: float,
        fit: OutputFit | None = None,
        max_live: Mapping[str, int] | None = None,
    ) -> Hold:
        """Hold ``amount`` on every scope or none (one statement); BudgetExceeded if refused.

        Due holds on the same scopes are expired first. A replay returns the stored hold.
        With ``fit``, the same statement decides the largest hold that fits. With
        ``max_live``, an advisory lock per capped scope (in scope order, held to commit)
        serialises the capped reserves of that scope in every process, and the statement
        that follows counts their live holds from a snapshot taken under the lock.
        """
        hold_id = validate_hold_id(hold_id)
        scope_t = validate_scopes(scopes)
        nanos = to_nanos(amount)
        ttl_td = timedelta(microseconds=_us(validate_ttl(ttl)))
        fit = validate_fit(fit, nanos)
        caps = validate_max_live(max_live, scope_t)
        args: tuple[Any, ...] = (hold_id, list(scope_t), nanos, ttl_td)
        kind = "reserve"
        smallest = nanos
        if fit is not None:
            kind, smallest = "reserve_fit", fit.nanos(fit.min_tokens)
            args += (
                fit.min_tokens,
                fit.max_tokens,
                Decimal(fit.base_units),
                Decimal(fit.token_units),
                Decimal(10**fit.digits),
            )
        if caps:
            args += ([scope for scope, _ in caps], [most for _, most in caps])
        for attempt in range(_RETRIES):
            if caps:
                rows = await self._capped(_reserve_sql(fit=fit is not None, caps=True), caps, args)
            else:
                rows = await self._combined(kind, scope_t, args)
            first = rows[0]
            if not first["fresh"] or (first["admit"] and first["created_at"] is None):
                replayed = await self._replay_reserve(hold_id, scope_t, smallest, nanos)
                if replayed is not None:
                    return replayed
                continue  # the competing reserve rolled back: reserve afresh
            held = first["held"]
            if caps and first["crowded_scope"] is not None:
                if first["skipped"] and attempt < _RETRIES - 1:
                    await anyio.sleep(0.001 * (attempt + 1))  # as for a budget, below
                    continue
                raise ConcurrencyExceeded(
                    scope=first["crowded_scope"],
                    limit=first["crowded_most"],
                    live=first["crowded_live"],
                )
            if first["admit"]:
                self._remember(hold_id, scope_t)
                return Hold(
                    hold_id=hold_id,
                    scopes=scope_t,
                    amount=from_nanos(held),
                    state=HoldState.HELD,
                    created_at=first["created_at"],
                    expires_at=first["expires_at"],
                    remaining=_remaining(rows, held),
                )
            refusal = _refusal(rows, held)
            if refusal is not None:
                if first["skipped"] and attempt < _RETRIES - 1:
                    # A due hold on these budgets was being released by another
                    # transaction; once it commits, the room may be there.
                    await anyio.sleep(0.001 * (attempt + 1))
                    continue
                raise refusal
            # Some scope has no counter row for this window yet: create it (unused, so
            # invisible until a hold is admitted on it) and reserve again.
            missing = [r for r in rows if not r["present"]]
            await self._fetch(
                _ENSURE_COUNTERS, [r["scope"] for r in missing], [r["ws"] for r in missing]
            )
        raise LedgerUnavailableError(
            f"could not reserve hold {hold_id!r}: the store kept changing under it; retry"
        )

    async def _capped(
        self, sql: str, caps: tuple[tuple[str, int], ...], args: tuple[Any, ...]
    ) -> list[Any]:
        """A capped reserve: the scopes' advisory locks, then the statement, one commit."""
        for attempt in range(_RETRIES):
            try:
                async with self._conn() as conn, conn.transaction():
                    for scope, _ in caps:
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                            f"gatewaykit:live:{self.schema}:{scope}",
                        )
                    return list(await conn.fetch(sql, *args))
            except LedgerUnavailableError as exc:
                if not _deadlock(exc) or attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def _replay_reserve(
        self, hold_id: str, scopes: tuple[str, ...], smallest: int, nanos: int
    ) -> Hold | None:
        rows = await self._fetch(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE hold_id = $1", hold_id)
        if not rows:
            return None
        row = rows[0]
        if row["state"] == "released" and not row["scopes"]:
            return _hold(row)  # a tombstone: the release came first
        if tuple(row["scopes"]) != scopes or not smallest <= row["amount"] <= nanos:
            raise HoldConflictError(
                f"hold {hold_id!r} was reserved with other scopes or another amount; "
                "use a fresh hold id for a new request"
            )
        return await self._touch(hold_id)

    async def _touch(self, hold_id: str) -> Hold:
        rows = await self._fetch(_TOUCH, hold_id)
        if not rows:
            raise HoldNotFoundError(f"no hold {hold_id!r}")
        row = rows[0]
        if row["expired_now"]:
            return _hold(row, state="expired")
        return _hold(row)

    async def settle(
        self, hold_id: str, actual: Decimal, *, record: UsageRecord | None = None
    ) -> Hold:
        """Charge ``actual`` into the hold's window, release the rest, write ``record``.

        One statement; after expiry it is a late charge. A replay returns the stored hold.
        """
        hold_id = validate_hold_id(hold_id)
        nanos = to_nanos(actual)
        _check_record(record)
        args = (hold_id, nanos, *_record_args(record))
        scopes = self._hold_scopes.get(hold_id)
        if record is not None and record.response_context is not None:
            rows = await self._settle_remembering(args, record.response_context)
        elif scopes is not None:
            rows = await self._combined("settle", scopes, args)
        else:
            rows = await self._fetch(_SETTLE, *args)
        row = rows[0]
        if row["hold_id"] is None:
            raise HoldNotFoundError(f"no hold {hold_id!r}; reserve before settling")
        self._hold_scopes.pop(hold_id, None)
        if row["was"] is not None:
            return _hold(row, state="settled", charged=nanos, late=row["new_late"])
        if row["state"] == "settled" and row["charged"] != nanos:
            raise HoldConflictError(
                f"hold {hold_id!r} was already settled at ${from_nanos(row['charged'])}, "
                f"not ${from_nanos(nanos)}"
            )
        return _hold(row)

    async def release(self, hold_id: str, *, record: UsageRecord | None = None) -> Hold:
        """Refund a live hold; a release of an unknown id leaves a tombstone."""
        hold_id = validate_hold_id(hold_id)
        _check_record(record)
        args = (hold_id, True, *_record_args(record))
        for _ in range(_RETRIES):
            row = (await self._fetch(_RELEASE_HOLD, *args))[0]
            if row["hold_id"] is None:
                if row["tomb_at"] is None:
                    continue  # a reserve of this id committed meanwhile: release it
                return Hold(
                    hold_id=hold_id,
                    scopes=(),
                    amount=Decimal(0),
                    state=HoldState.RELEASED,
                    created_at=row["tomb_at"],
                    expires_at=row["tomb_at"],
                )
            self._hold_scopes.pop(hold_id, None)
            if row["new_state"] is not None:
                return _hold(row, state=row["new_state"])
            return _hold(row)
        raise LedgerUnavailableError(f"could not release hold {hold_id!r}; retry")

    async def extend(self, hold_id: str, *, ttl: float) -> Hold:
        """Heartbeat: move a live hold's expiry to now + ``ttl`` (never earlier)."""
        hold_id = validate_hold_id(hold_id)
        ttl_td = timedelta(microseconds=_us(validate_ttl(ttl)))
        rows = await self._fetch(_EXTEND, hold_id, ttl_td)
        if not rows:
            raise HoldNotFoundError(f"no hold {hold_id!r}")
        row = rows[0]
        state = "expired" if row["expired_now"] else row["state"]
        if state != "held" or row["new_expires"] is None:
            raise HoldClosedError(f"hold {hold_id!r} is {state}; it cannot be extended")
        return _hold(row, expires_at=row["new_expires"])

    async def get_hold(self, hold_id: str) -> Hold | None:
        """The hold as stored, or None."""
        hold_id = validate_hold_id(hold_id)
        rows = await self._fetch(f"SELECT {_HOLD_COLUMNS} FROM holds WHERE hold_id = $1", hold_id)
        return _hold(rows[0]) if rows else None

    async def holds(self, *, live_only: bool = True, limit: int = 1000) -> list[Hold]:
        """Holds, newest first."""
        where = "WHERE state = 'held' " if live_only else ""
        rows = await self._fetch(
            f"SELECT {_HOLD_COLUMNS} FROM holds {where}ORDER BY created_at DESC, seq DESC LIMIT $1",
            validate_limit(limit),
        )
        return [_hold(r) for r in rows]

    async def sweep(self) -> int:
        """Expire every due hold (in batches of ``sweep_batch``); return how many.

        Safe to run from every instance at once: each due hold is expired exactly once.
        """
        total = 0
        while True:
            row = (await self._fetch(_SWEEP, self.sweep_batch))[0]
            swept: int = row["expired"]
            total += swept
            if swept < self.sweep_batch:
                break
        await self._prune_contexts()
        await self._fetch(_DENIALS_PRUNE)
        await self._rollup()
        return total

    async def _rollup(self) -> int:
        """Fold the usage records written since the last rollup into usage_daily, up to a
        bound no uncommitted record lies below; return how many seq values it moved.

        The bound needs a SHARE lock on usage_records for an instant: it waits for the
        transactions writing records (settles queue behind it meanwhile), at most
        ``_ROLLUP_LOCK_WAIT_MS``; past that this sweep leaves the rollup to the next one.
        """
        async with self._conn() as conn:
            if not await conn.fetchval(
                "SELECT seq < (SELECT coalesce(max(seq), 0) FROM usage_records) FROM usage_rollup"
            ):
                return 0  # nothing new: no lock
            try:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = {_ROLLUP_LOCK_WAIT_MS}")
                    await conn.execute(_ROLLUP_BOUND)
                    bound = await conn.fetchval("SELECT max(seq) FROM usage_records")
            except asyncpg.LockNotAvailableError:
                logger.info("usage rollup skipped: records were being written for too long")
                return 0
        moved = 0
        while True:
            rows = await self._fetch(_ROLLUP, bound, _ROLLUP_BATCH, report=True)
            if not rows:  # caught up, or another instance is rolling up
                return moved
            moved += rows[0]["moved"]

    async def check(self) -> list[str]:
        """Invariant violations (counters equal their holds, exactly); empty when healthy."""
        problems: list[str] = []
        for row in await self._fetch(_CHECK_COUNTERS):
            where = f"{row['scope']} (window starting {row['ws'].isoformat()})"
            if not row["present"]:
                problems.append(f"I10: holds were taken on {where} with no counter")
                continue
            if row["reserved"] != row["live"]:
                problems.append(
                    f"I2: {where} has reserved {row['reserved']} nano-USD but its live holds "
                    f"total {row['live']}"
                )
            if row["counted"] != row["holds"]:
                problems.append(
                    f"I2: {where} counts {row['counted']} live holds but has {row['holds']}"
                )
            if row["spent"] != row["charged"]:
                problems.append(
                    f"I3: {where} has spent {row['spent']} nano-USD but its settled holds "
                    f"charged {row['charged']}"
                )
            if row["spent"] < 0 or row["reserved"] < 0:
                problems.append(f"I9: {where} has a negative total")
        for message, sql in _CHECK_HOLDS.items():
            count = (await self._fetch(sql))[0][0]
            if count:
                problems.append(message.format(count))
        differ = (await self._fetch(_CHECK_ROLLUP, report=True))[0][0]
        if differ:
            problems.append(
                f"rollup: {differ} (day, user, key, model) sums in usage_daily differ from "
                "their records"
            )
        return problems

    # -- response contexts ---------------------------------------------------------------
    async def _settle_remembering(
        self, args: tuple[Any, ...], context: ResponseContext
    ) -> list[Any]:
        """The settle statement and, if it charged the hold, the context upsert: one
        transaction. (Not combined with other settles: the combiner sends one statement.)"""
        ttl = timedelta(microseconds=max(1, _us(context.ttl)))
        context_args = (list(context.ids), context.owner, context.tokens, context.growth, ttl)
        for attempt in range(_RETRIES):
            try:
                async with self._conn() as conn, conn.transaction():
                    rows = list(await conn.fetch(_SETTLE, *args))
                    if rows[0]["was"] is not None:  # this settle charged the hold
                        await conn.execute(_CONTEXT_UPSERT, *context_args)
                return rows
            except LedgerUnavailableError as exc:
                if not _deadlock(exc) or attempt == _RETRIES - 1:
                    raise
        raise AssertionError("unreachable")

    async def response_context(self, context_id: str, owner: str) -> int | None:
        """The context tokens remembered for ``context_id`` and ``owner``; None if unknown,
        expired or another owner's."""
        context_id = validate_context_id(context_id)
        (owner,) = validate_scopes([owner])
        rows = await self._fetch(_CONTEXT_READ, context_id, owner)
        return int(rows[0]["tokens"]) if rows else None

    # -- refusals ----------------------------------------------------------------------
    async def add_denials(self, counts: Mapping[tuple[datetime, str], int]) -> None:
        """Add refusal counts per (UTC hour, reason) in one statement (an upsert)."""
        rows = validate_denials(counts)
        if rows:
            hours, reasons, numbers = zip(*rows, strict=True)
            await self._fetch(_DENIALS_ADD, list(hours), list(reasons), list(numbers))

    async def denials(self, *, since: datetime, until: datetime | None = None) -> list[DenialCount]:
        """The stored refusal counts of the hours in ``[since, until)``, by hour and reason."""
        query = validate_denial_range(since, until)
        rows = await self._fetch(_DENIALS_READ, query.since, query.until, report=True)
        return [DenialCount(r["hour"], r["reason"], int(r["count"])) for r in rows]

    async def _prune_contexts(self) -> int:
        """Delete expired response contexts in batches of ``sweep_batch``."""
        total = 0
        while True:
            pruned: int = (await self._fetch(_CONTEXT_PRUNE, self.sweep_batch))[0]["pruned"]
            total += pruned
            if pruned < self.sweep_batch:
                return total

    # -- the combiner ------------------------------------------------------------------
    def _remember(self, hold_id: str, scopes: tuple[str, ...]) -> None:
        self._hold_scopes[hold_id] = scopes
        if len(self._hold_scopes) > 100_000:
            self._hold_scopes.popitem(last=False)

    async def _combined(self, kind: str, scopes: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """Run a reserve/settle, grouped with others queued for the same scopes.

        The first caller to find fewer than two groups in flight leads: it takes its own
        op and up to ``batch_max - 1`` queued ones, sends them in one round trip, and
        hands the lead to the next queued op. Shielded, so a cancelled caller never
        strands the ops it carries; ``command_timeout`` bounds the wait.
        """
        sql = _STATEMENTS[kind]
        if self.batch_max == 1:
            return await self._fetch(sql, *args)
        key = (kind, scopes)
        queue = self._queues.setdefault(key, collections.deque())
        op = _Op(args)
        with anyio.CancelScope(shield=True):
            if self._inflight.get(key, 0) < 2:
                self._inflight[key] = self._inflight.get(key, 0) + 1
            else:
                queue.append(op)
                await op.done.wait()
                if not op.lead:
                    return _result(op)
            try:
                batch = [op]
                while queue and len(batch) < self.batch_max:
                    batch.append(queue.popleft())
                await self._run_batch(sql, batch)
            finally:
                if queue:
                    heir = queue.popleft()
                    heir.lead = True
                    heir.done.set()
                else:
                    self._inflight[key] -= 1
                    if not self._inflight[key]:
                        del self._inflight[key]
                        if not queue:
                            self._queues.pop(key, None)
        return _result(op)

    async def _run_batch(self, sql: str, batch: list[_Op]) -> None:
        """One round trip and one commit for the whole group; fall back one by one."""
        try:
            if len(batch) == 1:
                batch[0].row = await self._fetch(sql, *batch[0].args)
            else:
                async with self._conn() as conn:
                    results = await conn.fetchmany(sql, [op.args for op in batch])
                # fetchmany flattens the rows: regroup them per op.
                _distribute(results, batch)
        except LedgerError as exc:
            if len(batch) == 1 or not (_deadlock(exc) or _refused_value(exc)):
                for op in batch:
                    op.error = exc
            else:
                # The group rolled back as one; run each alone so a deadlock is retried
                # and a value the server refused fails only the op that sent it.
                logger.debug("batched ledger statement failed (%s); running one by one", exc)
                for op in batch:
                    try:
                        op.row = await self._fetch(sql, *op.args)
                    except Exception as inner:
                        op.error = inner
        except Exception as exc:
            for op in batch:
                op.error = exc
        finally:
            for op in batch[1:]:
                op.done.set()

    # -- usage records -----------------------------------------------------------------
    async def usage(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        key: str | None = None,
        model: str | None = None,
        limit: int = 100,
    ) -> list[UsageRecord]:
        """Usage records, newest first; ``since <= created_at < until``."""
        query = validate_usage_filter(since, until, user, key, model)
        args: list[Any] = [validate_limit(limit)]
        where = _usage_where(query, args)
        rows = await self._fetch(
            f"SELECT {_USAGE_COLUMNS} FROM usage_records {where}"
            "ORDER BY created_at DESC, seq DESC LIMIT $1",
            *args,
            report=True,
        )
        return [
            UsageRecord(
                request_id=r["request_id"],
                key_id=r["key_id"],
                user=r["user_id"],
                model=r["model"],
                endpoint=r["endpoint"],
                status=r["status"],
                usage_source=r["usage_source"],
                input_tokens=r["input_tokens"],
                output_tokens=r["output_tokens"],
                cache_read_tokens=r["cache_read_tokens"],
                cache_write_tokens=r["cache_write_tokens"],
                cost=from_nanos(r["cost_nanos"]),
                error=r["error"],
                latency_ms=r["latency_ms"],
                created_at=r["created_at"],
            )
            for r in rows
        ]

    async def usage_totals(
        self,
        *,
        group_by: Sequence[UsageGroup],
        since: datetime | None = None,
        until: datetime | None = None,
        user: str | None = None,
        key: str | None = None,
        model: str | None = None,
    ) -> list[UsageTotal]:
        """Counts and sums of the matching usage records per group (days in UTC)."""
        groups = validate_usage_groups(group_by)
        query = validate_usage_filter(since, until, user, key, model)
        columns = [f"{_USAGE_GROUP_SQL[g]} AS g{i}" for i, g in enumerate(groups)]
        group = " GROUP BY " + ", ".join(str(i + 1) for i in range(len(groups))) if groups else ""
        # One snapshot for the watermark and the rows; plans for the actual bounds (the
        # pool plans generically, which cannot tell a recent watermark from seq 0).
        async with (
            self._conn() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            mark = int(await conn.fetchval("SELECT seq FROM usage_rollup"))
            args: list[Any] = []
            # Each part is summed on its own first: the union then carries a few rows per
            # group, not every rollup row and record of the range.
            select = ", ".join([*columns, _USAGE_SUMS])
            union = " UNION ALL ".join(
                f"SELECT {select} FROM ({part}) part{group}"
                for part in _usage_parts(query, mark, args)
            )
            outer = ", ".join([*(f"g{i}" for i in range(len(groups))), _USAGE_SUMS])
            rows = await conn.fetch(
                f"SELECT {outer} FROM ({union}) parts{group}",
                *args,
                timeout=self.report_timeout,
            )
        return sort_totals(
            [
                UsageTotal(
                    group=tuple(r[f"g{i}"] for i in range(len(groups))),
                    requests=int(r["requests"]),
                    input_tokens=int(r["input_tokens"]),
                    output_tokens=int(r["output_tokens"]),
                    cache_read_tokens=int(r["cache_read_tokens"]),
                    cache_write_tokens=int(r["cache_write_tokens"]),
                    cost=from_nanos(int(r["cost_nanos"])),
                )
                for r in rows
                if r["requests"]  # an aggregate without GROUP BY answers one row even for none
            ]
        )

    # -- API keys ------------------------------------------------------------------------
    async def create_key(self, record: ApiKeyRecord) -> ApiKeyRecord:
        """Store an API key (its hash only); a duplicate id or hash is a ConfigurationError."""
        if not isinstance(record, ApiKeyRecord):
            raise ConfigurationError("create_key needs an ApiKeyRecord")
        try:
            rows = await self._fetch(
                f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES "
                "($1, $2, $3, $4, $5, $6, coalesce($7, gk_now()), $8, $9, $10, $11, $12) "
                "RETURNING created_at",
                record.key_id,
                record.key_hash,
                record.prefix,
                record.user,
                record.team,
                record.revoked,
                record.created_at,
                record.expires_at,
                None if record.allowed_models is None else list(record.allowed_models),
                record.rpm,
                record.max_concurrent,
                record.tpm,
            )
        except LedgerUnavailableError as exc:
            if isinstance(exc.__cause__, asyncpg.UniqueViolationError):
                raise ConfigurationError(
                    f"API key {record.key_id!r} already exists (same id or same key hash)"
                ) from None
            raise
        self._key_epoch += 1
        return dataclasses.replace(record, created_at=rows[0]["created_at"])

    async def find_key(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this SHA-256 hash, or None."""
        rows = await self._fetch(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1", key_hash
        )
        return _key(rows[0]) if rows else None

    async def revoke_key(self, key_id: str) -> bool:
        """Revoke; False if no such key."""
        rows = await self._fetch(
            "UPDATE api_keys SET revoked = true WHERE key_id = $1 RETURNING 1", key_id
        )
        if rows:
            self._key_epoch += 1
        return bool(rows)

    async def update_key(self, key_id: str, **limits: int | None) -> ApiKeyRecord | None:
        """Set a key's limits (``rpm``, ``tpm``; None removes one); None if no such key."""
        changes = validate_key_limits(limits)
        assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(changes, start=2))
        rows = await self._fetch(
            f"UPDATE api_keys SET {assignments} WHERE key_id = $1 RETURNING {_KEY_COLUMNS}",
            key_id,
            *changes.values(),
        )
        if not rows:
            return None
        self._key_epoch += 1
        return _key(rows[0])

    async def list_keys(self, *, user: str | None = None) -> list[ApiKeyRecord]:
        """Keys in creation order, optionally of one user."""
        if user is None:
            rows = await self._fetch(f"SELECT {_KEY_COLUMNS} FROM api_keys ORDER BY seq")
        else:
            rows = await self._fetch(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_id = $1 ORDER BY seq", user
            )
        return [_key(r) for r in rows]


def _status(row: Any) -> BudgetStatus:
    period = _period(row["period_kind"], row["period_seconds"])
    start, end = period.window(row["t"])
    limit = row["limit_nanos"]
    return BudgetStatus(
        scope=row["scope"],
        limit=None if limit is None else from_nanos(limit),
        period=period,
        spent=from_nanos(row["spent"] or 0),
        held=from_nanos(row["reserved"] or 0),
        window_start=start,
        resets_at=end,
    )


def _remaining(rows: list[Any], nanos: int) -> tuple[tuple[str, Decimal | None], ...]:
    """Each scope's headroom after an admitted hold: the row was checked before the hold."""
    return tuple(
        (
            r["scope"],
            None
            if r["limit_nanos"] is None
            else from_nanos(r["limit_nanos"] - r["spent"] - r["reserved"] - nanos),
        )
        for r in rows
    )


def _refusal(rows: list[Any], nanos: int) -> BudgetExceeded | None:
    """The first refusing scope in sorted order, as the model reports it."""
    for r in rows:  # rows are in the sorted scope order
        limit = r["limit_nanos"]
        if limit is not None and r["spent"] + r["reserved"] + nanos > limit:
            period = _period(r["period_kind"], r["period_seconds"])
            return BudgetExceeded(
                scope=r["scope"],
                limit=from_nanos(limit),
                spent=from_nanos(r["spent"]),
                held=from_nanos(r["reserved"]),
                requested=from_nanos(nanos),
                resets_at=period.window(r["ws"])[1],
            )
    return None


def _distribute(results: list[Any], batch: list[_Op]) -> None:
    """Split fetchmany's flat row list back into each op's rows.

    A settle returns exactly one row; a reserve one row per scope, and every op in a
    group has the same scopes.
    """
    width = len(results) // len(batch)
    assert width * len(batch) == len(results)
    for i, op in enumerate(batch):
        op.row = results[i * width : (i + 1) * width]


def _result(op: _Op) -> Any:
    if op.error is not None:
        raise op.error
    return op.row


def _set_event(event: asyncio.Event, *_: Any) -> None:
    event.set()


def _deadlock(exc: BaseException) -> bool:
    return isinstance(exc.__cause__, asyncpg.DeadlockDetectedError)


def _refused_value(exc: BaseException) -> bool:
    """A value one statement carried was out of range (e.g. bigint overflow)."""
    return isinstance(exc.__cause__, asyncpg.DataError)


async def _keep_session(conn: Any) -> None:
    """Release a connection to the pool without asyncpg's reset round trip.

    Our statements leave nothing behind in a session (no LISTEN, cursor, advisory lock or
    SET; the test clock is set again before every use), and asyncpg still rolls back any
    open transaction itself, so the default ``RESET ALL`` etc. would only double the
    round trips of every operation.
    """


def _split_schema(url: str) -> tuple[str, str | None]:
    """Take a ``schema=`` query parameter out of the URL (asyncpg would send it as a GUC)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in query if name == "schema"]
    if not schemas:
        return url, None
    rest = urllib.parse.urlencode([(n, v) for n, v in query if n != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), schemas[-1]
