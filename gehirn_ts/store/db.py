"""The Store: every read and write of durable state, through adbapi.

One connection (SQLite has one writer at a time; WAL lets the CLI read meanwhile).
Each method is one transaction, committed (and so fsync'd) before its Deferred fires.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from gehirn_ts.events import Event, event_from_own_json
from gehirn_ts.recent import Recent
from gehirn_ts.store.batch import BatchedDatabase
from gehirn_ts.store.schema import configure

T = TypeVar("T")
Cursor = sqlite3.Cursor

KEY_PREFIX = "gts"


class Conflict(Exception):
    """A unique value is taken; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class NotFound(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    """Who an API key belongs to: an account, or the administrator (account None)."""

    key_id: str
    account_id: int | None
    account: str | None

    @property
    def is_admin(self) -> bool:
        return self.account_id is None


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    created_at: float


@dataclass(frozen=True)
class Subscription:
    id: str
    account_id: int
    account: str
    pattern: str
    url: str
    secret: str | None
    created_at: float
    deleted_at: float | None
    template: str | None = None
    batch: int = 1  # events a request (a webhook's CloudEvents batches); 1: one at a time


@dataclass(frozen=True)
class Attempt:
    n: int
    started_at: float
    duration: float
    outcome: str
    status_code: int | None
    detail: str | None


@dataclass(frozen=True)
class Delivery:
    id: str
    event_id: str
    subscription_id: str
    status: str  # pending | delivered | dead | cancelled
    attempts: int
    failures: int
    next_attempt_at: float | None
    last_error: str | None
    created_at: float
    updated_at: float


def new_id(prefix: str, now: float) -> str:
    """``prefix_`` and 28 hex digits: ``now`` in milliseconds (12), then 64 random bits.
    Rows made later go at the end of the id's index, not anywhere in it (as event ids,
    docs/decisions.md "Time-ordered ids")."""
    return f"{prefix}_{int(now * 1000):012x}{secrets.token_hex(8)}"


def hash_secret(secret: str) -> str:
    # API keys carry 256 random bits, so a fast hash is enough: there is nothing to
    # brute-force that a slow hash would protect.
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1], parts[2]


EXPIRE_BATCH = 500  # received rows forgotten per transaction


def _live_subscriptions(cur: Cursor, account: str | None) -> list[Subscription]:
    cur.execute(
        f"SELECT {_SUB_COLUMNS} FROM subscriptions s JOIN accounts a "  # noqa: S608
        "ON a.id = s.account_id WHERE s.deleted_at IS NULL AND (? IS NULL OR a.name = ?)",
        (account, account),
    )
    return [_subscription(r) for r in cur.fetchall()]


def new_password() -> str:
    """32 random letters and digits (190 bits): safe to paste into any command line or
    mail client (a token_urlsafe one may start with "-", which swaks and others read as
    an option)."""
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(32))


_PASSWORD_ALPHABET = string.ascii_letters + string.digits


def _account_id(cur: Cursor, name: str) -> int:
    cur.execute("SELECT id FROM accounts WHERE name = ?", (name,))
    row = cur.fetchone()
    if row is None:
        raise NotFound(f"no account named {name!r}")
    return int(row[0])


def _new_key(cur: Cursor, account_id: int | None, now: float) -> tuple[str, str]:
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    cur.execute(
        "INSERT INTO api_keys (id, account_id, is_admin, hash, created_at) VALUES (?,?,?,?,?)",
        (key_id, account_id, int(account_id is None), hash_secret(secret), now),
    )
    return key_id, f"{KEY_PREFIX}_{key_id}_{secret}"


_SUB_COLUMNS = (
    "s.id, s.account_id, a.name, s.pattern, s.url, s.secret, s.created_at, s.deleted_at, "
    "s.template, s.batch"
)
_DLV_COLUMNS = (
    "id, event_id, subscription_id, status, attempts, failures, next_attempt_at, last_error, "
    "created_at, updated_at"
)


_SUBSCRIPTIONS: dict[tuple[Any, ...], Subscription] = {}


def _subscription(row: Sequence[Any]) -> Subscription:
    # Routing reads every live subscription for each event; the same rows come back
    # until one changes, and a frozen dataclass costs ten object.__setattr__ to make.
    key = tuple(row)
    sub = _SUBSCRIPTIONS.get(key)
    if sub is None:
        if len(_SUBSCRIPTIONS) >= 1024:
            _SUBSCRIPTIONS.clear()
        sub = _SUBSCRIPTIONS[key] = Subscription(*row)
    return sub


_DLV_FIELDS = tuple(f.name for f in fields(Delivery))


def _delivery(row: Sequence[Any]) -> Delivery:
    # Written into __dict__ at once, as Event is: a frozen dataclass's own __init__
    # sets its ten fields one object.__setattr__ at a time (2.4 -> 1.0 us), and routing
    # and each attempt make one.
    delivery = object.__new__(Delivery)
    delivery.__dict__.update(zip(_DLV_FIELDS, row, strict=True))
    return delivery


# Ids a statement asks for at once (SQLite allows 999 parameters before 3.32).
_IN_CHUNK = 500


def _chunks(ids: Sequence[str]) -> list[Sequence[str]]:
    return [ids[i : i + _IN_CHUNK] for i in range(0, len(ids), _IN_CHUNK)]


def _bodies(cur: Cursor, ids: Sequence[str]) -> dict[str, bytes]:
    """The stored bodies of the events among ``ids`` (in one statement per 500)."""
    found: dict[str, bytes] = {}
    for part in _chunks(ids):
        cur.execute(
            f"SELECT id, body FROM events WHERE id IN ({','.join('?' * len(part))})",  # noqa: S608
            part,
        )
        found.update(cur.fetchall())
    return found


def _or_conflict(stored: bool | None, event: Event) -> bool | Conflict:
    """``Store._store_events``' outcome as ``insert_events`` answers it."""
    if stored is None:
        return Conflict("id", f"an event with id {event.id!r} exists with other content")
    return stored


class Store:
    def __init__(self, path: Path, clock: IReactorTime) -> None:
        self.path = path
        self._clock = clock
        self._db = BatchedDatabase(path)
        self._reader = BatchedDatabase(path, readonly=True)
        # Account name -> id for the event paths (two lookups an event otherwise).
        # Accounts are never renamed or deleted, so an id once read stays right; a
        # failed write forgets them all, in case one was read inside a transaction
        # whose commit failed.
        self._account_ids: dict[str, int] = {}
        # Domain owners and routes, asked twice for every received message (RCPT, then
        # processing), and API and DKIM keys: kept a few seconds, dropped on any change
        # made here (recent.py).
        self.mail_lookups = Recent(self._now)
        # Live subscriptions by account name, read by routing for every event: kept
        # until the database changes under this connection (PRAGMA data_version moves
        # with a commit by another connection: another node, the CLI) or here (a
        # subscription created or deleted, a failed write); looked at once a
        # transaction, in the writer thread.
        self._live: dict[str | None, list[Subscription]] = {}
        self._live_transaction = -1
        self._live_version = -1

    def lookups_changed(self, result: T) -> T:
        """A callback after a write of domains or routes: the kept answers go."""
        self.mail_lookups.changed()
        return result

    def close(self) -> Deferred[None]:
        return defer.gatherResults([self._db.close(), self._reader.close()]).addCallback(
            lambda _: None
        )

    def _read(self, fn: Any, *args: Any) -> Deferred[Any]:
        """A read-only interaction, on the reader connection."""
        return self._reader.run(fn, *args)

    def _now(self) -> float:
        return self._clock.seconds()

    def _run(self, fn: Any, *args: Any) -> Deferred[Any]:
        return self._db.run(fn, *args).addErrback(self._forget_kept)

    def _forget_kept(self, failure: Failure) -> Failure:
        self._account_ids.clear()
        self._live_version = -1  # read again in the next transaction
        return failure

    def _live_subscriptions(self, cur: Cursor, account: str | None) -> list[Subscription]:
        """``_live_subscriptions`` through the cache (called in the writer thread)."""
        if self._live_transaction != self._db.transactions:
            self._live_transaction = self._db.transactions
            version = cur.execute("PRAGMA data_version").fetchone()[0]
            if version != self._live_version:
                self._live_version = version
                self._live.clear()
        live = self._live.get(account)
        if live is None:
            live = self._live[account] = _live_subscriptions(cur, account)
        return live

    def _account_id(self, cur: Cursor, name: str) -> int:
        """``_account_id`` through the cache (called in the writer thread)."""
        known = self._account_ids.get(name)
        if known is None:
            known = self._account_ids[name] = _account_id(cur, name)
        return known

    # --- accounts and keys ---

    def create_account(self, name: str) -> Deferred[tuple[Account, str, str]]:
        """Create an account and its first API key: (account, key id, token)."""
        now = self._now()

        def tx(cur: Cursor) -> tuple[Account, str, str]:
            try:
                cur.execute("INSERT INTO accounts (name, created_at) VALUES (?,?)", (name, now))
            except sqlite3.IntegrityError:
                raise Conflict("name", f"an account named {name!r} exists already")
            account_id = cur.lastrowid
            assert account_id is not None
            key_id, token = _new_key(cur, account_id, now)
            return Account(account_id, name, now), key_id, token

        return self._run(tx)

    def list_accounts(self) -> Deferred[list[Account]]:
        def tx(cur: Cursor) -> list[Account]:
            cur.execute("SELECT id, name, created_at FROM accounts ORDER BY name")
            return [Account(*row) for row in cur.fetchall()]

        return self._read(tx)

    def account_by_name(self, name: str) -> Deferred[Account | None]:
        def tx(cur: Cursor) -> Account | None:
            cur.execute("SELECT id, name, created_at FROM accounts WHERE name = ?", (name,))
            row = cur.fetchone()
            return Account(*row) if row else None

        return self._read(tx)

    def create_key(self, account: str | None) -> Deferred[tuple[str, str]]:
        """A new key for the named account, or an admin key (None): (key id, token)."""
        now = self._now()

        def tx(cur: Cursor) -> tuple[str, str]:
            account_id = None
            if account is not None:
                account_id = _account_id(cur, account)
            return _new_key(cur, account_id, now)

        return self._run(tx)

    def revoke_key(self, key_id: str) -> Deferred[None]:
        now = self._now()

        def tx(cur: Cursor) -> None:
            cur.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no active key {key_id!r}")

        return self._run(tx).addCallback(self.lookups_changed)

    def list_keys(self) -> Deferred[list[dict[str, Any]]]:
        def tx(cur: Cursor) -> list[dict[str, Any]]:
            cur.execute(
                "SELECT k.id, a.name, k.is_admin, k.created_at, k.revoked_at FROM api_keys k "
                "LEFT JOIN accounts a ON a.id = k.account_id ORDER BY k.created_at"
            )
            return [
                {
                    "id": r[0],
                    "account": r[1],
                    "admin": bool(r[2]),
                    "created_at": r[3],
                    "revoked_at": r[4],
                }
                for r in cur.fetchall()
            ]

        return self._read(tx)

    def authenticate(self, token: str) -> Deferred[Principal | None]:
        """The key's principal, or None. A valid key's answer is kept a few seconds
        (recent.py), as Dovecot's auth cache keeps logins: every API request asked the
        reader thread, and under load the answer waited 17 ms in its queue (the sending
        benchmark, docs/performance.md). Kept by a hash of the whole token, so only the
        right secret finds it; a key revoked by another process (the CLI) stops working
        within ``recent.LOOKUP_SECONDS``, one revoked here at once."""
        return self.mail_lookups.lookup(
            ("key", hash_secret(token)),
            lambda: self._authenticate(token),
            keep_if=lambda principal: principal is not None,
        )

    def _authenticate(self, token: str) -> Deferred[Principal | None]:
        parts = split_token(token)

        def tx(cur: Cursor) -> Principal | None:
            if parts is None:
                return None
            key_id, secret = parts
            cur.execute(
                "SELECT k.hash, k.account_id, a.name FROM api_keys k "
                "LEFT JOIN accounts a ON a.id = k.account_id "
                "WHERE k.id = ? AND k.revoked_at IS NULL",
                (key_id,),
            )
            row = cur.fetchone()
            if row is None or not hmac.compare_digest(row[0], hash_secret(secret)):
                return None
            return Principal(key_id, row[1], row[2])

        return self._read(tx)

    # --- subscriptions ---

    def create_subscription(
        self,
        account_id: int,
        pattern: str,
        url: str,
        secret: str | None,
        template: str | None = None,
        batch: int = 1,
    ) -> Deferred[Subscription]:
        now = self._now()
        sub_id = new_id("sub", now)

        def tx(cur: Cursor) -> Subscription:
            self._live.clear()
            cur.execute(
                "INSERT INTO subscriptions (id, account_id, pattern, url, secret, created_at, "
                "template, batch) VALUES (?,?,?,?,?,?,?,?)",
                (sub_id, account_id, pattern, url, secret, now, template, batch),
            )
            return self._get_subscription(cur, sub_id)

        return self._run(tx)

    @staticmethod
    def _get_subscription(cur: Cursor, sub_id: str) -> Subscription:
        cur.execute(
            f"SELECT {_SUB_COLUMNS} FROM subscriptions s JOIN accounts a ON a.id = s.account_id "  # noqa: S608
            "WHERE s.id = ?",
            (sub_id,),
        )
        row = cur.fetchone()
        if row is None:
            raise NotFound(sub_id)
        return _subscription(row)

    def get_subscription(self, sub_id: str) -> Deferred[Subscription]:
        return self._read(self._get_subscription, sub_id)

    def list_subscriptions(self, account_id: int | None) -> Deferred[list[Subscription]]:
        def tx(cur: Cursor) -> list[Subscription]:
            cur.execute(
                f"SELECT {_SUB_COLUMNS} FROM subscriptions s JOIN accounts a "  # noqa: S608
                "ON a.id = s.account_id WHERE s.deleted_at IS NULL "
                "AND (? IS NULL OR s.account_id = ?) ORDER BY s.created_at, s.id",
                (account_id, account_id),
            )
            return [_subscription(r) for r in cur.fetchall()]

        return self._read(tx)

    def delete_subscription(self, sub_id: str, account_id: int | None) -> Deferred[None]:
        now = self._now()

        def tx(cur: Cursor) -> None:
            self._live.clear()
            cur.execute(
                "UPDATE subscriptions SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL "
                "AND (? IS NULL OR account_id = ?)",
                (now, sub_id, account_id, account_id),
            )
            if cur.rowcount == 0:
                raise NotFound(sub_id)

        return self._run(tx)

    # --- events and deliveries ---

    def insert_event(self, event: Event) -> Deferred[bool]:
        """Store an event. False when the same event (same id, same content) exists;
        Conflict when its id is taken by a different event."""

        def one(outcomes: list[bool | Conflict]) -> bool:
            if isinstance(outcomes[0], Conflict):
                raise outcomes[0]
            return outcomes[0]

        return self.insert_events([event]).addCallback(one)

    def insert_events(
        self, events: Sequence[Event], before: Callable[[Cursor], object] | None = None
    ) -> Deferred[list[bool | Conflict]]:
        """Store events in one interaction; for each, in order: True when stored, False
        when the same event (same id, same content) exists, a Conflict when its id is
        taken by a different event (that one alone is left out). ``before`` runs first,
        in the same transaction (what the events tell of, written with them)."""
        rows = [(event, event.to_json()) for event in events]
        return self._db.run_merged(self._insert_many, (rows, before, self._now())).addErrback(
            self._forget_kept
        )

    def _store_events(
        self, cur: Cursor, events: Sequence[tuple[Event, bytes, float]]
    ) -> list[bool | None]:
        """Store the (event, its JSON, time) not yet stored, with one read for all the
        ids and one insert for the new ones. For each, in order: True when stored now,
        False when the same event was there, None when its id is another event's."""
        stored = _bodies(cur, [event.id for event, _, _ in events])
        new: list[tuple[str, int | None, str, bytes, float]] = []
        outcomes: list[bool | None] = []
        for event, body, now in events:
            known = stored.get(event.id)
            if known is None:
                account_id = None if event.account is None else self._account_id(cur, event.account)
                new.append((event.id, account_id, event.type, body, now))
                stored[event.id] = body
                outcomes.append(True)
            # Most often the stored bytes are these very bytes; parse only if not.
            elif known == body or json.loads(known) == json.loads(body):
                outcomes.append(False)
            else:
                outcomes.append(None)
        if new:
            cur.executemany(
                "INSERT INTO events (id, account_id, type, body, received_at) VALUES (?,?,?,?,?)",
                new,
            )
        return outcomes

    def _insert_many(
        self,
        cur: Cursor,
        items: list[tuple[list[tuple[Event, bytes]], Callable[[Cursor], object] | None, float]],
    ) -> list[list[bool | Conflict]]:
        """``insert_events``' transaction for several calls (the API requests and the
        received messages that come together): one read for all their ids and one
        insert for the new events. Two statements an event, and a savepoint a call,
        were most of such a transaction (docs/performance.md)."""
        for _, before, _ in items:
            if before is not None:
                before(cur)
        outcomes = iter(
            self._store_events(
                cur, [(event, body, now) for rows, _, now in items for event, body in rows]
            )
        )
        return [[_or_conflict(next(outcomes), event) for event, _ in rows] for rows, _, _ in items]

    def get_event(self, event_id: str, account_id: int | None) -> Deferred[Event]:
        def tx(cur: Cursor) -> Event:
            cur.execute(
                "SELECT body FROM events WHERE id = ? AND (? IS NULL OR account_id = ?)",
                (event_id, account_id, account_id),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(event_id)
            return event_from_own_json(row[0])

        return self._read(tx)

    def route_event(
        self, event: Event, select: Callable[[list[Subscription]], list[Subscription]]
    ) -> Deferred[tuple[list[Delivery], list[Subscription]]]:
        """Routing in one transaction: the live subscriptions ``select`` picks, the event
        stored when missing, one delivery per picked subscription (idempotent). Returns
        the deliveries not yet attempted and the picked subscriptions. The events routed
        together (a bus message's) are routed in one call (``_route_many``)."""
        return self._db.run_merged(self._route_many, (event, select, self._now())).addErrback(
            self._forget_kept
        )

    def _route_many(
        self,
        cur: Cursor,
        items: list[tuple[Event, Callable[[list[Subscription]], list[Subscription]], float]],
    ) -> list[tuple[list[Delivery], list[Subscription]]]:
        """``route_event``'s transaction for several events, in a few statements."""
        chosen = [
            select(self._live_subscriptions(cur, event.account)) for event, select, _ in items
        ]
        routed = [n for n, picked in enumerate(chosen) if picked]
        if not routed:
            return [([], [])] * len(items)
        # The publisher has nearly always stored the event already (a publisher that
        # died between the store and the bus has not): stored here when missing.
        outcomes = self._store_events(
            cur, [(items[n][0], items[n][0].to_json(), items[n][2]) for n in routed]
        )
        # None: the id belongs to another event (the publish got a 409).
        foreign = {n for n, outcome in zip(routed, outcomes, strict=True) if outcome is None}
        live = [n for n in routed if n not in foreign]
        cur.executemany(
            "INSERT OR IGNORE INTO deliveries (id, event_id, subscription_id, status, "
            "created_at, updated_at) VALUES (?,?,?,'pending',?,?)",
            [
                (new_id("dlv", items[n][2]), items[n][0].id, sub.id, items[n][2], items[n][2])
                for n in live
                for sub in chosen[n]
            ],
        )
        pending: dict[str, list[Delivery]] = {}
        for rows in _chunks(sorted({items[n][0].id for n in live})):
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries WHERE event_id IN "  # noqa: S608
                f"({','.join('?' * len(rows))}) AND status = 'pending' AND attempts = 0 "
                "ORDER BY id",
                rows,
            )
            for row in cur.fetchall():
                delivery = _delivery(row)
                pending.setdefault(delivery.event_id, []).append(delivery)
        out: list[tuple[list[Delivery], list[Subscription]]] = [
            ([], chosen[n]) for n in range(len(items))
        ]
        stale: list[tuple[float, str]] = []
        for n in live:
            event, _, now = items[n]
            wanted = {s.id for s in chosen[n]}
            deliveries = pending.get(event.id, [])
            # A delivery made by an earlier routing of this event (a crash, a requeue)
            # for a subscription deleted since is cancelled, as a retry of one is.
            gone = [d for d in deliveries if d.subscription_id not in wanted]
            if gone:
                stale.extend((now, d.id) for d in gone)
                deliveries = [d for d in deliveries if d.subscription_id in wanted]
            out[n] = (deliveries, chosen[n])
        if stale:
            cur.executemany(
                "UPDATE deliveries SET status = 'cancelled', updated_at = ? WHERE id = ?",
                stale,
            )
        return out

    def create_deliveries(
        self, event_id: str, subscription_ids: Sequence[str]
    ) -> Deferred[list[Delivery]]:
        """One delivery per subscription (idempotent); those not yet attempted."""
        now = self._now()

        def tx(cur: Cursor) -> list[Delivery]:
            cur.executemany(
                "INSERT OR IGNORE INTO deliveries (id, event_id, subscription_id, status, "
                "created_at, updated_at) VALUES (?,?,?,'pending',?,?)",
                [(new_id("dlv", now), event_id, sub_id, now, now) for sub_id in subscription_ids],
            )
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries WHERE event_id = ? "  # noqa: S608
                "AND status = 'pending' AND attempts = 0 ORDER BY id",
                (event_id,),
            )
            return [_delivery(r) for r in cur.fetchall()]

        return self._run(tx)

    def get_delivery(self, delivery_id: str) -> Deferred[Delivery]:
        def tx(cur: Cursor) -> Delivery:
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries WHERE id = ?",  # noqa: S608
                (delivery_id,),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(delivery_id)
            return _delivery(row)

        return self._read(tx)

    def delivery_context(self, delivery_id: str) -> Deferred[tuple[Delivery, Event, Subscription]]:
        """A delivery with its event and subscription, read in one transaction."""

        def tx(cur: Cursor) -> tuple[Delivery, Event, Subscription]:
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries WHERE id = ?",  # noqa: S608
                (delivery_id,),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(delivery_id)
            delivery = _delivery(row)
            cur.execute("SELECT body FROM events WHERE id = ?", (delivery.event_id,))
            event = event_from_own_json(cur.fetchone()[0])
            return delivery, event, self._get_subscription(cur, delivery.subscription_id)

        return self._read(tx)

    def record_attempt(
        self,
        delivery_id: str,
        *,
        started_at: float,
        duration: float,
        outcome: str,
        status_code: int | None,
        detail: str | None,
        new_status: str,
        next_attempt_at: float | None,
        failed: bool,
    ) -> Deferred[None]:
        """Log one attempt and move the delivery to its new status, atomically. The
        attempts recorded together (a batch request's) go in one call."""
        row = (
            int(failed),
            new_status,
            next_attempt_at,
            detail if failed else None,
            self._now(),
            delivery_id,
        )
        attempt = (started_at, duration, outcome, status_code, detail, delivery_id)
        return self._db.run_merged(self._record_many, (row, attempt)).addErrback(self._forget_kept)

    @staticmethod
    def _record_many(
        cur: Cursor, items: list[tuple[tuple[Any, ...], tuple[Any, ...]]]
    ) -> list[None]:
        if len({row[-1] for row, _ in items}) < len(items):
            # The same delivery twice: one after the other, so each attempt has its own n.
            for item in items:
                Store._record_many(cur, [item])
            return [None] * len(items)
        cur.executemany(
            "UPDATE deliveries SET attempts = attempts + 1, failures = failures + ?, "
            "status = ?, next_attempt_at = ?, last_error = ?, updated_at = ? WHERE id = ?",
            [row for row, _ in items],
        )
        if cur.rowcount != len(items):
            raise NotFound("a delivery recorded is not in the store")
        # Numbered from the row just updated.
        cur.executemany(
            "INSERT INTO attempts (delivery_id, n, started_at, duration, outcome, "
            "status_code, detail) SELECT id, attempts, ?, ?, ?, ?, ? FROM deliveries WHERE id = ?",
            [attempt for _, attempt in items],
        )
        return [None] * len(items)

    def set_delivery_status(self, delivery_id: str, status: str) -> Deferred[None]:
        now = self._now()

        def tx(cur: Cursor) -> None:
            cur.execute(
                "UPDATE deliveries SET status = ?, next_attempt_at = NULL, updated_at = ? "
                "WHERE id = ?",
                (status, now, delivery_id),
            )

        return self._run(tx)

    def replay_delivery(self, delivery_id: str, account_id: int | None) -> Deferred[Delivery]:
        """Put a dead delivery back to pending with a fresh retry schedule."""
        now = self._now()

        def tx(cur: Cursor) -> Delivery:
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries d WHERE id = ? AND (? IS NULL OR "  # noqa: S608
                "EXISTS (SELECT 1 FROM subscriptions s WHERE s.id = d.subscription_id "
                "AND s.account_id = ?))",
                (delivery_id, account_id, account_id),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(delivery_id)
            if _delivery(row).status != "dead":
                raise Conflict("status", "only a dead delivery can be replayed")
            cur.execute(
                "UPDATE deliveries SET status = 'pending', failures = 0, next_attempt_at = ?, "
                "updated_at = ? WHERE id = ?",
                (now, now, delivery_id),
            )
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries WHERE id = ?",  # noqa: S608
                (delivery_id,),
            )
            return _delivery(cur.fetchone())

        return self._run(tx)

    def list_deliveries(
        self, account_id: int | None, status: str | None, limit: int
    ) -> Deferred[list[Delivery]]:
        def tx(cur: Cursor) -> list[Delivery]:
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries d WHERE (? IS NULL OR status = ?) "  # noqa: S608
                "AND (? IS NULL OR EXISTS (SELECT 1 FROM subscriptions s WHERE "
                "s.id = d.subscription_id AND s.account_id = ?)) "
                "ORDER BY created_at DESC, id LIMIT ?",
                (status, status, account_id, account_id, limit),
            )
            return [_delivery(r) for r in cur.fetchall()]

        return self._read(tx)

    def deliveries_of_event(self, event_id: str) -> Deferred[list[tuple[Delivery, list[Attempt]]]]:
        def tx(cur: Cursor) -> list[tuple[Delivery, list[Attempt]]]:
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries WHERE event_id = ? "  # noqa: S608
                "ORDER BY created_at, id",
                (event_id,),
            )
            out = []
            for row in cur.fetchall():
                delivery = _delivery(row)
                cur.execute(
                    "SELECT n, started_at, duration, outcome, status_code, detail FROM attempts "
                    "WHERE delivery_id = ? ORDER BY n",
                    (delivery.id,),
                )
                out.append((delivery, [Attempt(*a) for a in cur.fetchall()]))
            return out

        return self._read(tx)

    def pending_deliveries(self) -> Deferred[list[Delivery]]:
        def tx(cur: Cursor) -> list[Delivery]:
            cur.execute(
                f"SELECT {_DLV_COLUMNS} FROM deliveries WHERE status = 'pending'"  # noqa: S608
            )
            return [_delivery(r) for r in cur.fetchall()]

        return self._read(tx)


def bootstrap_domain(path: Path, domain: str, now: float) -> bool:
    """Serve ``domain`` for the account "local" when no domain is served yet."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        configure(conn)
        conn.execute("BEGIN IMMEDIATE")
        if conn.execute("SELECT 1 FROM domains LIMIT 1").fetchone() is not None:
            conn.execute("ROLLBACK")
            return False
        conn.execute(
            "INSERT OR IGNORE INTO accounts (name, created_at) VALUES ('local', ?)", (now,)
        )
        (account_id,) = conn.execute("SELECT id FROM accounts WHERE name = 'local'").fetchone()
        conn.execute(
            "INSERT INTO domains (name, account_id, created_at) VALUES (?,?,?)",
            (domain, account_id, now),
        )
        conn.execute("COMMIT")
        return True
    finally:
        conn.close()


def bootstrap_admin_key(path: Path, now: float) -> str | None:
    """Create the admin key if none exists yet (before the reactor runs); its token or None."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        configure(conn)
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "SELECT 1 FROM api_keys WHERE is_admin = 1 AND revoked_at IS NULL"
        ).fetchone()
        if row is not None:
            conn.execute("ROLLBACK")
            return None
        _, token = _new_key(conn.cursor(), None, now)
        conn.execute("COMMIT")
        return token
    finally:
        conn.close()


@dataclass(frozen=True)
class Received:
    id: str
    account: str | None
    object: str
    sender: str
    recipients: list[str]
    size: int
    received_at: float
    meta: dict[str, Any]


class MailStore:
    """Mail domains, SMTP credentials and the index of received mail."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def _run(self, fn: Any, *args: Any) -> Deferred[Any]:
        return self._store._run(fn, *args)

    def _read(self, fn: Any, *args: Any) -> Deferred[Any]:
        return self._store._read(fn, *args)

    def add_domain(self, name: str, account: str) -> Deferred[None]:
        now = self._store._now()

        def tx(cur: Cursor) -> None:
            account_id = _account_id(cur, account)
            try:
                cur.execute(
                    "INSERT INTO domains (name, account_id, created_at) VALUES (?,?,?)",
                    (name.lower(), account_id, now),
                )
            except sqlite3.IntegrityError:
                raise Conflict("name", f"the domain {name!r} is served already")

        return self._run(tx).addCallback(self._store.lookups_changed)

    def remove_domain(self, name: str) -> Deferred[None]:
        def tx(cur: Cursor) -> None:
            cur.execute("DELETE FROM domains WHERE name = ?", (name.lower(),))
            if cur.rowcount == 0:
                raise NotFound(f"no domain {name!r}")

        return self._run(tx).addCallback(self._store.lookups_changed)

    def list_domains(self) -> Deferred[list[tuple[str, str]]]:
        def tx(cur: Cursor) -> list[tuple[str, str]]:
            cur.execute(
                "SELECT d.name, a.name FROM domains d JOIN accounts a "
                "ON a.id = d.account_id ORDER BY d.name"
            )
            return [(r[0], r[1]) for r in cur.fetchall()]

        return self._read(tx)

    def domain_owner(self, name: str) -> Deferred[str | None]:
        domain = name.lower()

        def tx(cur: Cursor) -> str | None:
            cur.execute(
                "SELECT a.name FROM domains d JOIN accounts a ON a.id = d.account_id "
                "WHERE d.name = ?",
                (domain,),
            )
            row = cur.fetchone()
            return row[0] if row else None

        return self._store.mail_lookups.lookup(("owner", domain), lambda: self._read(tx))

    def account_id(self, name: str) -> Deferred[int | None]:
        def tx(cur: Cursor) -> int | None:
            try:
                return _account_id(cur, name)
            except NotFound:
                return None

        return self._read(tx)

    def create_credential(self, account: str, username: str) -> Deferred[str]:
        """SMTP credentials: a generated password (shown once), stored hashed."""
        now = self._store._now()
        password = new_password()

        def tx(cur: Cursor) -> str:
            account_id = _account_id(cur, account)
            try:
                cur.execute(
                    "INSERT INTO smtp_credentials (username, account_id, hash, created_at) "
                    "VALUES (?,?,?,?)",
                    (username, account_id, hash_secret(password), now),
                )
            except sqlite3.IntegrityError:
                raise Conflict("username", f"the SMTP user {username!r} exists already")
            return password

        return self._run(tx)

    def revoke_credential(self, username: str) -> Deferred[None]:
        now = self._store._now()

        def tx(cur: Cursor) -> None:
            cur.execute(
                "UPDATE smtp_credentials SET revoked_at = ? WHERE username = ? "
                "AND revoked_at IS NULL",
                (now, username),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no active SMTP user {username!r}")

        return self._run(tx)

    def list_credentials(self) -> Deferred[list[dict[str, Any]]]:
        """SMTP users (never their password hashes)."""

        def tx(cur: Cursor) -> list[dict[str, Any]]:
            cur.execute(
                "SELECT c.username, a.name, c.created_at, c.revoked_at FROM smtp_credentials c "
                "JOIN accounts a ON a.id = c.account_id ORDER BY c.username"
            )
            return [
                {"username": u, "account": a, "created_at": c, "revoked_at": r}
                for u, a, c, r in cur.fetchall()
            ]

        return self._read(tx)

    def smtp_authenticate(self, username: str, password: str) -> Deferred[str | None]:
        def tx(cur: Cursor) -> str | None:
            cur.execute(
                "SELECT c.hash, a.name FROM smtp_credentials c JOIN accounts a "
                "ON a.id = c.account_id WHERE c.username = ? AND c.revoked_at IS NULL",
                (username,),
            )
            row = cur.fetchone()
            # Hash even for an unknown user, so timing does not tell which users exist.
            digest = hash_secret(password)
            if row is None or not hmac.compare_digest(row[0], digest):
                return None
            return str(row[1])

        return self._read(tx)

    def record_received(self, item: Received) -> Deferred[bool]:
        """Index a received message for an account; False if it is indexed already."""
        return self._run(self.received_tx(item))

    def received_tx(self, item: Received) -> Callable[[Cursor], bool]:
        """``record_received``'s transaction, for a caller that writes more with it."""

        def tx(cur: Cursor) -> bool:
            account_id = None
            if item.account is not None:
                cur.execute("SELECT id FROM accounts WHERE name = ?", (item.account,))
                row = cur.fetchone()
                account_id = row[0] if row else None
            cur.execute(
                "INSERT OR IGNORE INTO received (id, account_id, object, sender, recipients, "
                "size, received_at, meta) VALUES (?,?,?,?,?,?,?,?)",
                (
                    item.id,
                    account_id,
                    item.object,
                    item.sender,
                    json.dumps(item.recipients),
                    item.size,
                    item.received_at,
                    json.dumps(item.meta),
                ),
            )
            return cur.rowcount == 1

        return tx

    def get_received(self, item_id: str, account_id: int | None) -> Deferred[Received]:
        def tx(cur: Cursor) -> Received:
            cur.execute(
                "SELECT r.id, a.name, r.object, r.sender, r.recipients, r.size, r.received_at, "
                "r.meta FROM received r LEFT JOIN accounts a ON a.id = r.account_id "
                "WHERE r.id = ? AND (? IS NULL OR r.account_id = ?) ORDER BY a.name LIMIT 1",
                (item_id, account_id, account_id),
            )
            row = cur.fetchone()
            if row is None:
                raise NotFound(item_id)
            return Received(
                row[0],
                row[1],
                row[2],
                row[3],
                json.loads(row[4]),
                row[5],
                row[6],
                json.loads(row[7]),
            )

        return self._read(tx)


ROUTE_ACTIONS = ("store", "forward", "reject")


@dataclass(frozen=True)
class Route:
    id: str
    account: str
    match: str  # "user@domain" (one address) or "@domain" (every address of the domain)
    action: str  # store | forward | reject
    forward_to: list[str]
    created_at: float


def parse_static_route(text: str) -> tuple[str, str, list[str]]:
    """A route from the config: "MATCH ACTION [ADDRESS,ADDRESS...]" (ValueError if bad)."""
    from gehirn_ts.mta.address import parse_path
    from gehirn_ts.mta.replies import SmtpError

    def address(value: str) -> str:
        try:
            mailbox, rest = parse_path(f"<{value}>".encode(), kind="recipient")
        except SmtpError:
            mailbox, rest = None, b"x"
        if mailbox is None or rest or mailbox.is_routed:
            raise ValueError(f"{value!r} is not an e-mail address")
        return str(mailbox)

    parts = text.split()
    if len(parts) not in (2, 3):
        raise ValueError(f'{text!r}: expected "MATCH ACTION [ADDRESS,...]"')
    match = parts[0]
    match = (
        "@" + address("postmaster" + match).split("@")[1]
        if match.startswith("@")
        else address(match)
    )
    action = parts[1]
    if action not in ROUTE_ACTIONS:
        raise ValueError(f"{text!r}: the action must be one of {', '.join(ROUTE_ACTIONS)}")
    targets = [address(a) for a in parts[2].split(",")] if len(parts) == 3 else []
    if (action == "forward") != bool(targets):
        raise ValueError(f"{text!r}: a forward route, and only it, lists addresses")
    return match, action, targets


class RouteStore:
    """Routes of received mail. A served domain with no route is a catch-all (store);
    once it has address routes and no "@domain" route, other addresses are unknown.
    Routes from the config (``static``) come before those made over the API."""

    def __init__(self, store: Store, static: Sequence[str] = ()) -> None:
        self._store = store
        self.set_static(static)

    def set_static(self, static: Sequence[str]) -> None:
        """The config's routes (again, on SIGHUP)."""
        self._static = [parse_static_route(text) for text in static]
        self._store.mail_lookups.changed()

    def _run(self, fn: Any, *args: Any) -> Deferred[Any]:
        return self._store._run(fn, *args)

    def _read(self, fn: Any, *args: Any) -> Deferred[Any]:
        return self._store._read(fn, *args)

    def create(
        self, account_id: int, match: str, action: str, forward_to: list[str]
    ) -> Deferred[Route]:
        now = self._store._now()
        route_id = new_id("rte", now)
        domain = match.rpartition("@")[2]

        def tx(cur: Cursor) -> Route:
            cur.execute("SELECT account_id FROM domains WHERE name = ?", (domain,))
            row = cur.fetchone()
            if row is None or row[0] != account_id:
                raise Conflict("match", f"{domain!r} is not a domain of this account")
            try:
                cur.execute(
                    "INSERT INTO routes (id, account_id, match, domain, action, forward_to, "
                    "created_at) VALUES (?,?,?,?,?,?,?)",
                    (route_id, account_id, match, domain, action, json.dumps(forward_to), now),
                )
            except sqlite3.IntegrityError:
                raise Conflict("match", f"a route for {match!r} exists already")
            return self._get(cur, route_id)

        return self._run(tx).addCallback(self._store.lookups_changed)

    @staticmethod
    def _get(cur: Cursor, route_id: str) -> Route:
        cur.execute(
            "SELECT r.id, a.name, r.match, r.action, r.forward_to, r.created_at "
            "FROM routes r JOIN accounts a ON a.id = r.account_id WHERE r.id = ?",
            (route_id,),
        )
        row = cur.fetchone()
        if row is None:
            raise NotFound(route_id)
        return Route(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5])

    def list_routes(self, account_id: int | None) -> Deferred[list[Route]]:
        def tx(cur: Cursor) -> list[Route]:
            cur.execute(
                "SELECT id FROM routes WHERE (? IS NULL OR account_id = ?) ORDER BY match",
                (account_id, account_id),
            )
            return [self._get(cur, r[0]) for r in cur.fetchall()]

        return self._read(tx)

    def delete(self, route_id: str, account_id: int | None) -> Deferred[None]:
        def tx(cur: Cursor) -> None:
            cur.execute(
                "DELETE FROM routes WHERE id = ? AND (? IS NULL OR account_id = ?)",
                (route_id, account_id, account_id),
            )
            if cur.rowcount == 0:
                raise NotFound(route_id)

        return self._run(tx).addCallback(self._store.lookups_changed)

    def resolve(self, address: str) -> Deferred[tuple[str, Route | None] | None]:
        """For an address of a served domain: (owner, route or None for the default
        store); None when the address is unknown (or the domain not served)."""
        local, _, domain = address.rpartition("@")

        def tx(cur: Cursor) -> tuple[str, Route | None] | None:
            cur.execute(
                "SELECT a.name FROM domains d JOIN accounts a ON a.id = d.account_id "
                "WHERE d.name = ?",
                (domain,),
            )
            row = cur.fetchone()
            if row is None:
                return None
            owner = row[0]
            for match in (f"{local}@{domain}", f"@{domain}"):
                for static_match, action, targets in self._static:
                    if static_match == match:
                        return owner, Route(f"config:{match}", owner, match, action, targets, 0.0)
            if any(m.endswith("@" + domain) and not m.startswith("@") for m, _, _ in self._static):
                return None  # the config lists this domain's addresses
            for match in (f"{local}@{domain}", f"@{domain}"):
                cur.execute("SELECT id FROM routes WHERE match = ?", (match,))
                found = cur.fetchone()
                if found is not None:
                    return owner, self._get(cur, found[0])
            cur.execute(
                "SELECT 1 FROM routes WHERE domain = ? AND match NOT LIKE '@%' LIMIT 1",
                (domain,),
            )
            if cur.fetchone() is not None:
                return None  # the domain lists its addresses: this one is unknown
            return owner, None

        return self._store.mail_lookups.lookup(("route", address), lambda: self._read(tx))

    def expire_received(
        self, before: float, limit: int = EXPIRE_BATCH
    ) -> Deferred[tuple[int, list[str]]]:
        """Forget up to ``limit`` received rows older than ``before``, oldest first, in
        one transaction: (how many went, the KVS objects no row uses any more). The
        caller repeats while a whole batch went. All of them in one transaction held
        the store's writer, and every write behind it, for as long as that took."""

        def tx(cur: Cursor) -> tuple[int, list[str]]:
            cur.execute(
                "SELECT rowid, id, object FROM received WHERE received_at < ? "
                "ORDER BY received_at LIMIT ?",
                (before, limit),
            )
            rows = cur.fetchall()
            cur.executemany("DELETE FROM received WHERE rowid = ?", [(r[0],) for r in rows])
            unused = []
            # One message's rows (one per account) share its object: asked by id, the
            # primary key's first column. Asked by object, each was a scan of the table.
            for message_id, obj in sorted({(r[1], r[2]) for r in rows}):
                cur.execute("SELECT 1 FROM received WHERE id = ? LIMIT 1", (message_id,))
                if cur.fetchone() is None:
                    unused.append(obj)
            return len(rows), unused

        return self._run(tx)
