"""DKIM signing keys, per domain and selector (private keys stay in the database)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred

from gehirn_ts.mta.dkim import SigningKey, dns_record, generate
from gehirn_ts.store.db import Conflict, Cursor, NotFound, Store
from gehirn_ts.store.schema import configure


class DkimKeyStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, key: SigningKey) -> Deferred[None]:
        def tx(cur: Cursor) -> None:
            cur.execute("SELECT 1 FROM domains WHERE name = ?", (key.domain,))
            if cur.fetchone() is None:
                raise Conflict("domain", f"{key.domain} is not a served domain (domain add)")
            cur.execute(
                "SELECT 1 FROM dkim_keys WHERE domain = ? AND selector = ?",
                (key.domain, key.selector),
            )
            if cur.fetchone() is not None:
                raise Conflict("selector", f"{key.domain} has a key with selector {key.selector}")
            cur.execute(
                "INSERT INTO dkim_keys (domain, selector, algorithm, private_key, created_at) "
                "VALUES (?,?,?,?,?)",
                (key.domain, key.selector, key.algorithm, key.private_key, self._store._now()),
            )

        return self._store._run(tx).addCallback(self._store.lookups_changed)  # type: ignore[no-any-return]

    def remove(self, domain: str, selector: str) -> Deferred[None]:
        def tx(cur: Cursor) -> None:
            cur.execute(
                "DELETE FROM dkim_keys WHERE domain = ? AND selector = ?", (domain, selector)
            )
            if cur.rowcount == 0:
                raise NotFound(f"{selector}._domainkey.{domain}")

        return self._store._run(tx).addCallback(self._store.lookups_changed)  # type: ignore[no-any-return]

    def keys_for(self, domain: str) -> Deferred[list[SigningKey]]:
        """The domain's signing keys, kept a few seconds with the other mail lookups
        (``Store.mail_lookups``): every message sent asked the reader thread, and under
        load its answer waited 11-14 ms in the reader's queue (docs/performance.md,
        session 14). A key the CLI adds or removes is used or dropped within
        ``recent.LOOKUP_SECONDS``."""
        domain = domain.lower()

        def tx(cur: Cursor) -> list[SigningKey]:
            cur.execute(
                "SELECT domain, selector, algorithm, private_key FROM dkim_keys "
                "WHERE domain = ? ORDER BY algorithm DESC, selector",
                (domain,),
            )
            return [SigningKey(*row) for row in cur.fetchall()]

        return self._store.mail_lookups.lookup(("dkim", domain), lambda: self._store._read(tx))

    def list_keys(self) -> Deferred[list[dict[str, Any]]]:
        def tx(cur: Cursor) -> list[dict[str, Any]]:
            cur.execute(
                "SELECT domain, selector, algorithm, created_at FROM dkim_keys "
                "ORDER BY domain, selector"
            )
            return [
                {"domain": d, "selector": s, "algorithm": a, "created_at": c}
                for d, s, a, c in cur.fetchall()
            ]

        return self._store._read(tx)  # type: ignore[no-any-return]


def bootstrap_dkim_key(path: Path, domain: str, now: float, selector: str = "dev") -> str | None:
    """A first start's development key for the bootstrap domain (as the dev TLS pair is
    made): returns the TXT record value to publish, or None if the domain has keys."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        configure(conn)
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT 1 FROM dkim_keys WHERE domain = ?", (domain,)).fetchone():
            conn.execute("ROLLBACK")
            return None
        private, public = generate("rsa")
        conn.execute(
            "INSERT INTO dkim_keys (domain, selector, algorithm, private_key, created_at) "
            "VALUES (?,?,?,?,?)",
            (domain, selector, "rsa", private, now),
        )
        conn.execute("COMMIT")
        return dns_record(domain, selector, "rsa", public)[1]
    finally:
        conn.close()
