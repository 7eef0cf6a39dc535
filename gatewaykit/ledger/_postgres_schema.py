"""Versioned migrations of the PostgreSQL ledger schema.

Migration *n* (1-based) is ``MIGRATIONS[n - 1]``; the applied version is recorded in
``gatewaykit_schema``. Every migration runs in one transaction under an advisory lock,
so many gateway processes may open the same schema at once. A database written by a
newer gatewaykit (a version this code does not know) is refused, never downgraded.

Money columns are ``BIGINT`` nano-USD (I11). Times come from ``gk_now()``: the
database server's clock, unless a test set ``gatewaykit.now`` for the session.
"""

from __future__ import annotations

from typing import Any

from gatewaykit.errors import SchemaError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

_V1 = r"""
CREATE TABLE gatewaykit_schema (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The store clock: the server's wall clock when the statement reads it (not the start of
-- its transaction, which may have waited on locks). Statements read it once, in a CTE.
-- Tests may pin it per session with set_config('gatewaykit.now', ...).
CREATE FUNCTION gk_now() RETURNS timestamptz
LANGUAGE sql VOLATILE AS $$
    SELECT coalesce(nullif(current_setting('gatewaykit.now', true), '')::timestamptz,
                    clock_timestamp())
$$;

-- Start of the window containing t, for a budget period (mirrors Period.window).
-- STABLE, like extract() in its body, so the planner inlines it.
CREATE FUNCTION gk_window_start(kind text, seconds bigint, t timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE coalesce(kind, 'none')
        WHEN 'none' THEN timestamptz '1970-01-01 00:00:00+00'
        WHEN 'rolling' THEN to_timestamp(
            (floor(extract(epoch FROM t))::bigint / seconds) * seconds)
        WHEN 'day' THEN date_trunc('day', t, 'UTC')
        WHEN 'week' THEN date_trunc('week', t, 'UTC')
        WHEN 'month' THEN date_trunc('month', t, 'UTC')
    END
$$;

CREATE TABLE budgets (
    scope          text PRIMARY KEY,
    limit_nanos    bigint CHECK (limit_nanos >= 0),
    period_kind    text NOT NULL DEFAULT 'none'
                   CHECK (period_kind IN ('none', 'rolling', 'day', 'week', 'month')),
    period_seconds bigint CHECK (period_seconds > 0),
    updated_at     timestamptz NOT NULL
);

-- One row per scope and period window: a cache of the holds, updated in the same
-- statement as the hold row. No reset job: a new window is a new row.
CREATE TABLE counters (
    scope        text NOT NULL,
    window_start timestamptz NOT NULL,
    spent        bigint NOT NULL DEFAULT 0,
    reserved     bigint NOT NULL DEFAULT 0,
    -- false until a hold is admitted: rows made ready by a reserve that was then refused
    -- do not make the scope known.
    used         boolean NOT NULL DEFAULT false,
    PRIMARY KEY (scope, window_start)
) WITH (fillfactor = 50);

CREATE TABLE holds (
    seq        bigserial NOT NULL,  -- insertion order, for listings (holds_recent)
    hold_id    text PRIMARY KEY,
    scopes     text[] NOT NULL,
    windows    timestamptz[] NOT NULL,  -- window start per scope, aligned with scopes
    amount     bigint NOT NULL CHECK (amount >= 0),
    state      text NOT NULL CHECK (state IN ('held', 'settled', 'released', 'expired')),
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    charged    bigint NOT NULL DEFAULT 0 CHECK (charged >= 0),
    late       boolean NOT NULL DEFAULT false,
    ended_at   timestamptz,
    CHECK (cardinality(scopes) = cardinality(windows))
);
CREATE INDEX holds_due ON holds (expires_at) WHERE state = 'held';
CREATE INDEX holds_recent ON holds (created_at DESC, seq DESC);

CREATE TABLE usage_records (
    seq                bigserial NOT NULL UNIQUE,
    request_id         text PRIMARY KEY,
    key_id             text,
    user_id            text,
    model              text NOT NULL,
    endpoint           text NOT NULL,
    status             text NOT NULL,
    usage_source       text NOT NULL,
    input_tokens       bigint NOT NULL,
    output_tokens      bigint NOT NULL,
    cache_read_tokens  bigint NOT NULL,
    cache_write_tokens bigint NOT NULL,
    cost_nanos         bigint NOT NULL,
    error              text,
    latency_ms         bigint,
    created_at         timestamptz NOT NULL
);
CREATE INDEX usage_records_user ON usage_records (user_id, seq DESC);

CREATE TABLE api_keys (
    seq            bigserial NOT NULL UNIQUE,
    key_id         text PRIMARY KEY,
    key_hash       text NOT NULL UNIQUE,
    prefix         text NOT NULL,
    user_id        text NOT NULL,
    team           text,
    revoked        boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL,
    expires_at     timestamptz,
    allowed_models text[],
    rpm            integer
);
"""

# The context a continuation of a stored response (or conversation) is billed for, per
# id and owner scope; written by the settle that charged the response.
_V2 = r"""
CREATE TABLE response_contexts (
    context_id text NOT NULL,
    owner      text NOT NULL,
    tokens     bigint NOT NULL CHECK (tokens >= 0),
    updated_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (context_id, owner)
);
CREATE INDEX response_contexts_expiry ON response_contexts (expires_at);
"""

# Every change to api_keys (a revocation by the CLI, a new key, an UPDATE by hand) sends
# a notification when its transaction commits; gateways LISTEN and drop their cached key
# lookups. The payload is the schema, since one database may hold several ledgers.
_V3 = r"""
CREATE FUNCTION gk_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('gatewaykit_keys', TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_changed
AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON api_keys
FOR EACH STATEMENT EXECUTE FUNCTION gk_keys_changed();
"""

# Usage listings and totals (ledger.usage / usage_totals) filter by time, user or key and
# list newest first; seq breaks ties between rows of the same instant.
_V4 = r"""
DROP INDEX usage_records_user;
CREATE INDEX usage_records_time ON usage_records (created_at, seq);
CREATE INDEX usage_records_user_time ON usage_records (user_id, created_at, seq);
CREATE INDEX usage_records_key_time ON usage_records (key_id, created_at, seq);
"""

# Live holds per budget window, kept with the reserved amount in the same statements, so
# a reserve can cap the requests a key (or any scope) has in flight; and the keys' cap.
_V5 = r"""
ALTER TABLE counters ADD COLUMN live bigint NOT NULL DEFAULT 0 CHECK (live >= 0);
UPDATE counters c SET live = x.n
FROM (SELECT u.scope, u.ws, count(*) AS n
      FROM holds h, unnest(h.scopes, h.windows) AS u(scope, ws)
      WHERE h.state = 'held' GROUP BY u.scope, u.ws) x
WHERE c.scope = x.scope AND c.window_start = x.ws;
ALTER TABLE api_keys ADD COLUMN max_concurrent integer CHECK (max_concurrent > 0);
"""

# A key's tokens-per-minute limit (gatewaykit.ratelimit), beside its rpm.
_V6 = r"""
ALTER TABLE api_keys ADD COLUMN tpm integer CHECK (tpm > 0);
"""

# Daily sums of the usage records up to a watermark (usage_rollup.seq): usage_totals reads
# whole days from here and only the records past the watermark, and the partial days at a
# range's edges, from usage_records. Filled here for the existing records, under a SHARE
# lock that waits for every transaction still writing records (and holds new ones back
# until this one commits), and by every sweep after. The unique index tells a missing
# user or key from an empty one; sums are integer numerics, as sum() over the records is.
_V7 = r"""
LOCK TABLE usage_records IN SHARE MODE;
CREATE TABLE usage_daily (
    day                date NOT NULL,
    user_id            text,
    key_id             text,
    model              text NOT NULL,
    requests           bigint NOT NULL,
    input_tokens       numeric(39) NOT NULL,
    output_tokens      numeric(39) NOT NULL,
    cache_read_tokens  numeric(39) NOT NULL,
    cache_write_tokens numeric(39) NOT NULL,
    cost_nanos         numeric(39) NOT NULL
);
CREATE UNIQUE INDEX usage_daily_group ON usage_daily
    (day, model, coalesce(user_id, ''), (user_id IS NULL), coalesce(key_id, ''), (key_id IS NULL));
CREATE INDEX usage_daily_user ON usage_daily (user_id, day);
CREATE INDEX usage_daily_key ON usage_daily (key_id, day);
CREATE TABLE usage_rollup (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq bigint NOT NULL
);
INSERT INTO usage_rollup (seq) SELECT coalesce(max(seq), 0) FROM usage_records;
INSERT INTO usage_daily
SELECT (created_at AT TIME ZONE 'UTC')::date, user_id, key_id, model, count(*),
       sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
       sum(cache_write_tokens), sum(cost_nanos)
FROM usage_records GROUP BY 1, 2, 3, 4;
ANALYZE usage_daily;
"""

# Refused requests per UTC hour and reason, added to by every gateway process's periodic
# flush (ledger.add_denials); sweep prunes old hours.
_V8 = r"""
CREATE TABLE denials (
    hour   timestamptz NOT NULL,
    reason text NOT NULL,
    count  bigint NOT NULL CHECK (count > 0),
    PRIMARY KEY (hour, reason)
);
"""

#: Migration scripts in order; never edit a released one, append a new one.
MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4, _V5, _V6, _V7, _V8)
SCHEMA_VERSION = len(MIGRATIONS)

_OURS = ("budgets", "counters", "holds", "usage_records", "api_keys")


async def migrate(conn: Any, schema: str, *, timeout: float | None = None) -> int:
    """Bring ``schema`` to :data:`SCHEMA_VERSION`; return the version found before.

    ``conn`` is an asyncpg connection whose ``search_path`` is ``schema``; ``timeout``
    bounds each migration script (None: the connection's command timeout). Raises
    :class:`SchemaError` for a schema written by a newer gatewaykit, or one that holds
    tables of the same names but no version record (not ours).
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "gatewaykit:" + schema)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET LOCAL search_path TO "{schema}"')
        tables = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1",
                schema,
            )
        }
        if "gatewaykit_schema" in tables:
            found = await conn.fetchval("SELECT coalesce(max(version), 0) FROM gatewaykit_schema")
        elif tables.intersection(_OURS):
            raise SchemaError(
                f"schema {schema!r} has tables named like gatewaykit's but no gatewaykit_schema "
                "version table; it was not created by gatewaykit — use another schema"
            )
        else:
            found = 0
        if found > SCHEMA_VERSION:
            raise SchemaError(
                f"schema {schema!r} is at gatewaykit ledger version {found}, newer than this "
                f"gatewaykit understands ({SCHEMA_VERSION}); upgrade gatewaykit"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            await conn.execute(MIGRATIONS[version - 1], timeout=timeout)
            await conn.execute("INSERT INTO gatewaykit_schema (version) VALUES ($1)", version)
        return int(found)
