"""The versioned SQLite schema and its migrations.

``PRAGMA user_version`` holds the number of migrations applied. Migrations only ever
append: a released one is never edited. They run at start, before the reactor, so a
database the code cannot use stops startup with a clear message.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

MIGRATIONS: list[str] = [
    # 1: accounts, API keys, subscriptions, events, deliveries and their attempts.
    """
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        account_id INTEGER REFERENCES accounts(id),
        is_admin INTEGER NOT NULL DEFAULT 0,
        hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL,
        CHECK ((is_admin = 1 AND account_id IS NULL) OR (is_admin = 0 AND account_id IS NOT NULL))
    );
    CREATE TABLE subscriptions (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        pattern TEXT NOT NULL,
        url TEXT NOT NULL,
        secret TEXT,
        created_at REAL NOT NULL,
        deleted_at REAL
    );
    CREATE INDEX subscriptions_account ON subscriptions(account_id) WHERE deleted_at IS NULL;
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        account_id INTEGER REFERENCES accounts(id),
        type TEXT NOT NULL,
        body BLOB NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE TABLE deliveries (
        id TEXT PRIMARY KEY,
        event_id TEXT NOT NULL REFERENCES events(id),
        subscription_id TEXT NOT NULL REFERENCES subscriptions(id),
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (event_id, subscription_id)
    );
    CREATE INDEX deliveries_status ON deliveries(status);
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        delivery_id TEXT NOT NULL REFERENCES deliveries(id),
        n INTEGER NOT NULL,
        started_at REAL NOT NULL,
        duration REAL NOT NULL,
        outcome TEXT NOT NULL,
        status_code INTEGER,
        detail TEXT
    );
    CREATE INDEX attempts_delivery ON attempts(delivery_id);
    """,
    # 2: mail domains, SMTP credentials, received mail (the KVS index).
    """
    CREATE TABLE domains (
        name TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        created_at REAL NOT NULL
    );
    CREATE TABLE smtp_credentials (
        username TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE received (
        id TEXT NOT NULL,
        account_id INTEGER REFERENCES accounts(id),
        object TEXT NOT NULL,
        sender TEXT NOT NULL,
        recipients TEXT NOT NULL,
        size INTEGER NOT NULL,
        received_at REAL NOT NULL,
        meta TEXT NOT NULL,
        PRIMARY KEY (id, account_id)
    );
    CREATE INDEX received_account ON received(account_id, received_at);
    """,
    # 3: routes for received mail, per address or per domain.
    """
    CREATE TABLE routes (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        match TEXT NOT NULL UNIQUE,
        action TEXT NOT NULL,
        forward_to TEXT NOT NULL DEFAULT '[]',
        created_at REAL NOT NULL
    );
    CREATE INDEX received_time ON received(received_at);
    """,
    # 4: the outbound queue (per-recipient state and attempts) and DKIM signing keys.
    """
    CREATE TABLE outbound (
        id TEXT PRIMARY KEY,
        account_id INTEGER REFERENCES accounts(id),
        origin TEXT NOT NULL,
        sender TEXT NOT NULL,
        size INTEGER NOT NULL,
        body TEXT,
        ret TEXT,
        envid TEXT,
        header_message_id TEXT,
        subject TEXT,
        idempotency_key TEXT,
        request_hash TEXT,
        tags TEXT NOT NULL DEFAULT '[]',
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        held INTEGER NOT NULL DEFAULT 0,
        UNIQUE (account_id, idempotency_key)
    );
    CREATE INDEX outbound_created ON outbound(created_at);
    CREATE TABLE outbound_rcpts (
        message_id TEXT NOT NULL REFERENCES outbound(id),
        n INTEGER NOT NULL,
        address TEXT NOT NULL,
        domain TEXT NOT NULL,
        notify TEXT,
        orcpt TEXT,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        delay_notices INTEGER NOT NULL DEFAULT 0,
        last_delay_notice REAL,
        reply TEXT,
        smtp_status TEXT,
        remote_mta TEXT,
        tls INTEGER,
        report TEXT,
        updated_at REAL NOT NULL,
        PRIMARY KEY (message_id, n)
    );
    CREATE INDEX outbound_due ON outbound_rcpts(next_attempt_at) WHERE status = 'queued';
    CREATE INDEX outbound_reports ON outbound_rcpts(message_id) WHERE report IS NOT NULL;
    CREATE TABLE outbound_attempts (
        id INTEGER PRIMARY KEY,
        message_id TEXT NOT NULL REFERENCES outbound(id),
        n INTEGER NOT NULL,
        started_at REAL NOT NULL,
        duration REAL NOT NULL,
        outcome TEXT NOT NULL,
        reply TEXT,
        remote_mta TEXT,
        tls INTEGER
    );
    CREATE INDEX outbound_attempts_message ON outbound_attempts(message_id);
    CREATE TABLE dkim_keys (
        domain TEXT NOT NULL,
        selector TEXT NOT NULL,
        algorithm TEXT NOT NULL,
        private_key TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (domain, selector)
    );
    """,
    # 5: a subscription's own message template (chat, SMS and e-mail destinations).
    """
    ALTER TABLE subscriptions ADD COLUMN template TEXT;
    """,
    # 6: a route's domain (what follows the last "@" of its match), so that looking up
    # a received message's recipient reads its domain's routes only, not every route.
    """
    ALTER TABLE routes ADD COLUMN domain TEXT NOT NULL DEFAULT '';
    UPDATE routes SET domain = substr(match, length(rtrim(match, replace(match, '@', ''))) + 1);
    CREATE INDEX routes_domain ON routes(domain);
    """,
    # 7: how many events a webhook subscription takes in one request (1: one at a time).
    """
    ALTER TABLE subscriptions ADD COLUMN batch INTEGER NOT NULL DEFAULT 1;
    """,
]


class SchemaError(Exception):
    pass


CACHE_KIB = 512


def configure(conn: sqlite3.Connection) -> None:
    """Per-connection settings: WAL, fsync on every commit, foreign keys."""
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: in WAL mode each commit is fsync'd, so an acknowledged write survives a crash.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=10000")
    # SQLite's page cache is 2 MiB a connection by default, and the daemon keeps three
    # (the store's writer and reader, the embedded bus). A reader's cache is emptied by
    # every commit of another connection (WAL), and the kernel caches the file anyway:
    # 512 KiB each measured no slower and saved 2 MB of RSS (docs/performance.md).
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")


def migrate(path: Path) -> int:
    """Bring the database at ``path`` to the newest schema; return its version."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        configure(conn)
        while True:
            # The version is read inside the write transaction, so that two processes
            # starting at once (nodes sharing a state directory) apply each step once.
            conn.execute("BEGIN IMMEDIATE")
            try:
                version: int = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > len(MIGRATIONS):
                    raise SchemaError(
                        f"{path}: schema version {version} is newer than this gehirn-ts "
                        f"({len(MIGRATIONS)}); upgrade gehirn-ts or restore a backup"
                    )
                if version == len(MIGRATIONS):
                    conn.execute("COMMIT")
                    return version
                for statement in MIGRATIONS[version].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={version + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        conn.close()
