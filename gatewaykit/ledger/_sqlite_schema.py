# ruff: noqa: S608  (SQL is assembled from constant fragments only; values are parameters)
"""The SQLite ledger's schema and its versioned migrations.

Every money column is an integer number of nano-USD and every time an integer number of
microseconds of the store clock; ``CHECK`` constraints make a float or a negative total
impossible to store (invariants I9 and I11 are enforced by the database, not just checked).
Checks on the hot tables avoid ``IN (...)`` lists: SQLite evaluates those several times
slower than the equivalent ``OR`` chain, and a hold row is written twice per request.
"""

from __future__ import annotations

import sqlite3

from gatewaykit.errors import SchemaError

__all__ = [
    "APPLICATION_ID",
    "DAY_SQL",
    "LATEST_VERSION",
    "MIGRATIONS",
    "ROLLUP_AGGREGATES",
    "ROLLUP_SUMS",
    "ROLLUP_UPSERT",
    "prepare",
]

#: ``PRAGMA application_id`` of a gatewaykit ledger ("gwkt"), so a foreign file is recognised.
APPLICATION_ID = 0x67776B74

_INT = "CHECK (typeof({0}) = 'integer' AND {0} >= 0)"

#: A record's UTC day number since 1970 (floored, so a time before 1970 is not day 0).
DAY_SQL = (
    "(CASE WHEN created_at >= 0 THEN created_at / 86400000000 "
    "ELSE (created_at + 1) / 86400000000 - 1 END)"
)
#: The sums usage_daily keeps per (day, user, key, model), and their aggregates of records.
ROLLUP_SUMS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_nanos",
)
ROLLUP_AGGREGATES = ", ".join(["count(*)", *(f"sum({c})" for c in ROLLUP_SUMS[1:])])
#: Adds the records with ``?1 < seq <= ?2`` to usage_daily.
ROLLUP_UPSERT = f"""
INSERT INTO usage_daily (day, user, key_id, model, {", ".join(ROLLUP_SUMS)})
SELECT {DAY_SQL}, user, key_id, model, {ROLLUP_AGGREGATES} FROM usage_records
WHERE seq > ?1 AND seq <= ?2 GROUP BY 1, 2, 3, 4
ON CONFLICT (day, model, coalesce(user, ''), user IS NULL, coalesce(key_id, ''), key_id IS NULL)
DO UPDATE SET {", ".join(f"{c} = {c} + excluded.{c}" for c in ROLLUP_SUMS)}
"""

#: version -> statements that upgrade the previous version to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE gatewaykit_schema (version INTEGER NOT NULL)",
        f"""CREATE TABLE budgets (
            scope TEXT PRIMARY KEY,
            limit_nanos INTEGER CHECK (limit_nanos IS NULL OR
                (typeof(limit_nanos) = 'integer' AND limit_nanos >= 0)),
            period_kind TEXT NOT NULL
                CHECK (period_kind IN ('none', 'rolling', 'day', 'week', 'month')),
            period_seconds INTEGER,
            updated_at INTEGER NOT NULL {_INT.format("updated_at")}
        )""",
        f"""CREATE TABLE counters (
            scope TEXT NOT NULL,
            window_start INTEGER NOT NULL,
            spent INTEGER NOT NULL DEFAULT 0 {_INT.format("spent")},
            reserved INTEGER NOT NULL DEFAULT 0 {_INT.format("reserved")},
            PRIMARY KEY (scope, window_start)
        ) WITHOUT ROWID""",
        f"""CREATE TABLE holds (
            seq INTEGER PRIMARY KEY,
            hold_id TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL,
            amount INTEGER NOT NULL {_INT.format("amount")},
            state TEXT NOT NULL CHECK (state = 'held' OR state = 'settled' OR
                state = 'released' OR state = 'expired'),
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            ended_at INTEGER,
            charged INTEGER NOT NULL DEFAULT 0 {_INT.format("charged")},
            overrun INTEGER NOT NULL DEFAULT 0 {_INT.format("overrun")},
            late INTEGER NOT NULL DEFAULT 0 CHECK (late = 0 OR late = 1)
        )""",
        "CREATE INDEX holds_live_expiry ON holds (expires_at) WHERE state = 'held'",
        """CREATE TABLE hold_scopes (
            hold_id TEXT NOT NULL,
            scope TEXT NOT NULL,
            window_start INTEGER NOT NULL,
            PRIMARY KEY (hold_id, scope)
        ) WITHOUT ROWID""",
        f"""CREATE TABLE usage_records (
            seq INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL UNIQUE,
            key_id TEXT,
            user TEXT,
            model TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            status TEXT NOT NULL,
            usage_source TEXT NOT NULL,
            input_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            cache_read_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            cost_nanos INTEGER NOT NULL {_INT.format("cost_nanos")},
            error TEXT,
            latency_ms INTEGER,
            created_at INTEGER NOT NULL
        )""",
        "CREATE INDEX usage_user ON usage_records (user, seq)",
        """CREATE TABLE api_keys (
            seq INTEGER PRIMARY KEY,
            key_id TEXT NOT NULL UNIQUE,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            user TEXT NOT NULL,
            team TEXT,
            revoked INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            expires_at INTEGER,
            allowed_models TEXT,
            rpm INTEGER
        )""",
        "CREATE INDEX api_keys_user ON api_keys (user, seq)",
    ),
    # The context a continuation of a stored response (or conversation) is billed for,
    # per id and owner scope; written by the settle that charged the response.
    2: (
        f"""CREATE TABLE response_contexts (
            context_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            tokens INTEGER NOT NULL {_INT.format("tokens")},
            updated_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            PRIMARY KEY (context_id, owner)
        ) WITHOUT ROWID""",
        "CREATE INDEX response_contexts_expiry ON response_contexts (expires_at)",
    ),
    # A counter every API key change bumps in its own transaction: other connections
    # re-read it when PRAGMA data_version says something was committed, so a running
    # gateway learns of a revocation (e.g. by the CLI) without polling the keys.
    3: (
        "CREATE TABLE key_epoch (id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL)",
        "INSERT INTO key_epoch (id, epoch) VALUES (1, 0)",
    ),
    # Usage listings and totals filter by time, user or key and list newest first
    # (ledger.usage / usage_totals); an index's rowid suffix (seq) breaks time ties.
    4: (
        "DROP INDEX usage_user",
        "CREATE INDEX usage_time ON usage_records (created_at)",
        "CREATE INDEX usage_user_time ON usage_records (user, created_at)",
        "CREATE INDEX usage_key_time ON usage_records (key_id, created_at)",
    ),
    # Live holds per budget window, kept with the reserved amount, so a reserve can cap
    # the requests a key (or any scope) has in flight; and the keys' own cap. The live
    # holds are grouped once (a subquery per counter row would scan them once per row).
    5: (
        f"ALTER TABLE counters ADD COLUMN live INTEGER NOT NULL DEFAULT 0 {_INT.format('live')}",
        """CREATE TEMP TABLE gk_live (scope TEXT NOT NULL, window_start INTEGER NOT NULL,
            n INTEGER NOT NULL, PRIMARY KEY (scope, window_start)) WITHOUT ROWID""",
        """INSERT INTO gk_live SELECT s.scope, s.window_start, count(*) FROM holds h
            JOIN hold_scopes s ON s.hold_id = h.hold_id WHERE h.state = 'held'
            GROUP BY s.scope, s.window_start""",
        """UPDATE counters SET live = (SELECT n FROM gk_live l WHERE l.scope = counters.scope
            AND l.window_start = counters.window_start)
            WHERE EXISTS (SELECT 1 FROM gk_live l WHERE l.scope = counters.scope
            AND l.window_start = counters.window_start)""",
        "DROP TABLE gk_live",
        "ALTER TABLE api_keys ADD COLUMN max_concurrent INTEGER",
    ),
    # A key's tokens-per-minute limit (gatewaykit.ratelimit), beside its rpm.
    6: ("ALTER TABLE api_keys ADD COLUMN tpm INTEGER",),
    # Daily sums of the usage records up to a watermark (usage_rollup.seq): usage_totals
    # reads whole days from here and only the records past the watermark, and the partial
    # days at a range's edges, from usage_records. Filled here for the existing records
    # (this transaction is the only writer) and by every sweep after. The one unique index
    # tells a missing user or key from an empty one.
    7: (
        f"""CREATE TABLE usage_daily (
            day INTEGER NOT NULL,
            user TEXT,
            key_id TEXT,
            model TEXT NOT NULL,
            {", ".join(f"{c} INTEGER NOT NULL {_INT.format(c)}" for c in ROLLUP_SUMS)}
        )""",
        """CREATE UNIQUE INDEX usage_daily_group ON usage_daily
            (day, model, coalesce(user, ''), user IS NULL, coalesce(key_id, ''), key_id IS NULL)""",
        "CREATE INDEX usage_daily_user ON usage_daily (user, day)",
        "CREATE INDEX usage_daily_key ON usage_daily (key_id, day)",
        """CREATE TABLE usage_rollup (id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL)""",
        "INSERT INTO usage_rollup (id, seq) SELECT 1, coalesce(max(seq), 0) FROM usage_records",
        f"""INSERT INTO usage_daily (day, user, key_id, model, {", ".join(ROLLUP_SUMS)})
            SELECT {DAY_SQL}, user, key_id, model, {ROLLUP_AGGREGATES} FROM usage_records
            GROUP BY 1, 2, 3, 4""",
    ),
    # Refused requests per UTC hour (microseconds of its start) and reason, added to by
    # every gateway process's periodic flush (ledger.add_denials); sweep prunes old hours.
    8: (
        """CREATE TABLE denials (
            hour INTEGER NOT NULL CHECK (typeof(hour) = 'integer'),
            reason TEXT NOT NULL,
            count INTEGER NOT NULL CHECK (typeof(count) = 'integer' AND count > 0),
            PRIMARY KEY (hour, reason)
        ) WITHOUT ROWID""",
    ),
}
LATEST_VERSION = max(MIGRATIONS)


def _version(conn: sqlite3.Connection, where: str) -> int:
    """The file's schema version; 0 for an empty database. Raises SchemaError if not ours."""
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise SchemaError(
            f"{where} is not a readable SQLite database ({exc}); restore it from a backup "
            "or point the ledger at another file"
        ) from None
    if not tables and app_id == 0:
        return 0
    if app_id != APPLICATION_ID or "gatewaykit_schema" not in tables:
        raise SchemaError(
            f"{where} is a SQLite database that gatewaykit did not create; "
            "use a new file for the ledger"
        )
    row = conn.execute("SELECT max(version) FROM gatewaykit_schema").fetchone()
    if row is None or not isinstance(row[0], int):
        raise SchemaError(f"{where} has no schema version; it is damaged, restore a backup")
    version: int = row[0]
    return version


def prepare(conn: sqlite3.Connection, where: str) -> int:
    """Create or upgrade the schema in ``conn`` (autocommit mode); return the version."""
    version = _version(conn, where)
    if version > LATEST_VERSION:
        raise SchemaError(
            f"{where} was written by a newer gatewaykit (schema version {version}; this "
            f"version knows up to {LATEST_VERSION}); upgrade gatewaykit to open it"
        )
    if version == LATEST_VERSION:
        return version
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _version(conn, where)  # another process may have migrated meanwhile
        for target in range(version + 1, LATEST_VERSION + 1):
            for statement in MIGRATIONS[target]:
                conn.execute(statement)
            conn.execute("DELETE FROM gatewaykit_schema")
            conn.execute("INSERT INTO gatewaykit_schema (version) VALUES (?)", (target,))
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return LATEST_VERSION
