"""The outbound queue's durable state: messages, per-recipient status, attempts.

The message itself is a file in the queue directory, fsync'd before its row is
committed; the row is the commit point (a file without a row was never acknowledged).
A recipient is ``queued`` until it reaches a final status (``delivered``, ``relayed``,
``failed``, ``deleted``), which is written once. ``report`` marks a status whose event
(and DSN, where asked) is still to be sent: it is cleared only after both are durable,
so a crash in between repeats them, with the same ids, and nothing is sent twice.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred

from gehirn_ts.store.db import Conflict, Cursor, NotFound, Store

FINAL = ("delivered", "relayed", "failed", "deleted")


@dataclass(frozen=True)
class NewRecipient:
    address: str
    notify: list[str] | None = None
    orcpt: tuple[str, str] | None = None


@dataclass(frozen=True)
class NewMessage:
    id: str
    account_id: int | None
    origin: str  # api | submission | relay | forward | report | edj
    sender: str
    size: int
    recipients: Sequence[NewRecipient]
    body: str | None = None
    ret: str | None = None
    envid: str | None = None
    header_message_id: str | None = None
    subject: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    tags: Sequence[str] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueuedMessage:
    id: str
    account: str | None
    origin: str
    sender: str
    size: int
    body: str | None
    ret: str | None
    envid: str | None
    header_message_id: str | None
    subject: str | None
    tags: list[str]
    metadata: dict[str, Any]
    created_at: float
    held: bool
    account_id: int | None


@dataclass(frozen=True)
class RecipientState:
    message_id: str
    n: int
    address: str
    domain: str
    notify: list[str] | None
    orcpt: tuple[str, str] | None
    status: str
    attempts: int
    next_attempt_at: float | None
    delay_notices: int
    last_delay_notice: float | None
    reply: str | None
    smtp_status: str | None
    remote_mta: str | None
    tls: bool | None
    report: str | None
    updated_at: float


@dataclass(frozen=True)
class Update:
    """What one attempt changed for one recipient."""

    n: int
    status: str  # queued (deferred) or a final status
    next_attempt_at: float | None
    reply: str | None
    smtp_status: str | None
    remote_mta: str | None
    tls: bool | None
    outcome: str  # delivered | relayed | deferred | failed
    report: str | None = None  # delivered | relayed | failed | delayed
    delay_notice: bool = False


@dataclass(frozen=True)
class AttemptRecord:
    n: int
    started_at: float
    duration: float
    outcome: str
    reply: str | None
    remote_mta: str | None
    tls: bool | None


_MESSAGE_COLUMNS = (
    "m.id, a.name, m.origin, m.sender, m.size, m.body, m.ret, m.envid, m.header_message_id, "
    "m.subject, m.tags, m.metadata, m.created_at, m.held, m.account_id"
)
_RCPT_COLUMNS = (
    "r.message_id, r.n, r.address, r.domain, r.notify, r.orcpt, r.status, r.attempts, "
    "r.next_attempt_at, r.delay_notices, r.last_delay_notice, r.reply, r.smtp_status, "
    "r.remote_mta, r.tls, r.report, r.updated_at"
)


def _message(row: Sequence[Any]) -> QueuedMessage:
    return QueuedMessage(
        id=row[0],
        account=row[1],
        origin=row[2],
        sender=row[3],
        size=row[4],
        body=row[5],
        ret=row[6],
        envid=row[7],
        header_message_id=row[8],
        subject=row[9],
        tags=json.loads(row[10]),
        metadata=json.loads(row[11]),
        created_at=row[12],
        held=bool(row[13]),
        account_id=row[14],
    )


def _rcpt(row: Sequence[Any]) -> RecipientState:
    return RecipientState(
        message_id=row[0],
        n=row[1],
        address=row[2],
        domain=row[3],
        notify=json.loads(row[4]) if row[4] else None,
        orcpt=(json.loads(row[5])[0], json.loads(row[5])[1]) if row[5] else None,
        status=row[6],
        attempts=row[7],
        next_attempt_at=row[8],
        delay_notices=row[9],
        last_delay_notice=row[10],
        reply=row[11],
        smtp_status=row[12],
        remote_mta=row[13],
        tls=None if row[14] is None else bool(row[14]),
        report=row[15],
        updated_at=row[16],
    )


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


class QueueStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    def _run(self, fn: Any, *args: Any) -> Deferred[Any]:
        return self._store._run(fn, *args)

    def _read(self, fn: Any, *args: Any) -> Deferred[Any]:
        return self._store._read(fn, *args)

    def enqueue(self, msg: NewMessage, now: float) -> Deferred[tuple[str, bool]]:
        """Queue a message (its file is durable already). Returns (id, created): a repeat
        of the same id, or of an idempotency key with the same request, returns the
        message queued first; a key reused for another request is a Conflict."""

        def tx(cur: Cursor) -> tuple[str, bool]:
            if msg.idempotency_key is not None:
                cur.execute(
                    "SELECT id, request_hash FROM outbound WHERE account_id IS ? "
                    "AND idempotency_key = ?",
                    (msg.account_id, msg.idempotency_key),
                )
                row = cur.fetchone()
                if row is not None:
                    if row[1] != msg.request_hash:
                        raise Conflict(
                            "Idempotency-Key",
                            "this Idempotency-Key was used for a different request",
                        )
                    return row[0], False
            cur.execute("SELECT 1 FROM outbound WHERE id = ?", (msg.id,))
            if cur.fetchone() is not None:
                return msg.id, False
            cur.execute(
                "INSERT INTO outbound (id, account_id, origin, sender, size, body, ret, envid, "
                "header_message_id, subject, idempotency_key, request_hash, tags, metadata, "
                "created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    msg.id,
                    msg.account_id,
                    msg.origin,
                    msg.sender,
                    msg.size,
                    msg.body,
                    msg.ret,
                    msg.envid,
                    msg.header_message_id,
                    msg.subject,
                    msg.idempotency_key,
                    msg.request_hash,
                    json.dumps(list(msg.tags)),
                    json.dumps(msg.metadata),
                    now,
                ),
            )
            cur.executemany(
                "INSERT INTO outbound_rcpts (message_id, n, address, domain, notify, orcpt, "
                "status, next_attempt_at, updated_at) VALUES (?,?,?,?,?,?,'queued',?,?)",
                [
                    (
                        msg.id,
                        n,
                        r.address,
                        _domain(r.address),
                        json.dumps(r.notify) if r.notify is not None else None,
                        json.dumps(list(r.orcpt)) if r.orcpt is not None else None,
                        now,
                        now,
                    )
                    for n, r in enumerate(msg.recipients)
                ],
            )
            return msg.id, True

        return self._run(tx)  # type: ignore[no-any-return]

    def due(
        self,
        now: float,
        limit: int,
        skip_domains: Sequence[str] = (),
        *,
        exclude: Collection[tuple[str, int]] = (),
        room: Mapping[str, int] | None = None,
        room_default: int = 0,
    ) -> Deferred[list[tuple[QueuedMessage, RecipientState]]]:
        """Recipients due by ``now``, oldest first, leaving out ``skip_domains`` (those
        at their concurrency limit: reading them each run only to skip them made every
        queue run cost as much as the backlog), the (message id, n) keys in ``exclude``
        (attempts running or just finished) and, with ``room``, the messages of a domain
        past how many more it may start (``room_default`` for a domain not named). Only
        the rows kept are made into objects (each costs two JSON parses)."""
        excluded = frozenset(exclude)
        caps = None if room is None else dict(room)

        def tx(cur: Cursor) -> list[tuple[QueuedMessage, RecipientState]]:
            marks = ",".join("?" * len(skip_domains))
            cur.execute(
                f"SELECT {_MESSAGE_COLUMNS}, {_RCPT_COLUMNS} FROM outbound_rcpts r "  # noqa: S608 - constant column lists and placeholders
                "JOIN outbound m ON m.id = r.message_id "
                "LEFT JOIN accounts a ON a.id = m.account_id "
                "WHERE r.status = 'queued' AND r.next_attempt_at <= ? AND m.held = 0 "
                f"AND r.domain NOT IN ({marks}) "
                "ORDER BY r.next_attempt_at LIMIT ?",
                (now, *skip_domains, limit),
            )
            out = []
            messages: dict[str, QueuedMessage] = {}
            started: dict[str, set[str]] = {}
            for row in cur.fetchall():
                message_id, n, domain = row[15], row[16], row[18]
                if (message_id, n) in excluded:
                    continue
                if caps is not None:
                    taken = started.setdefault(domain, set())
                    if message_id not in taken:
                        if len(taken) >= caps.get(domain, room_default):
                            continue
                        taken.add(message_id)
                msg = messages.get(message_id)
                if msg is None:
                    msg = messages[message_id] = _message(row[:15])
                out.append((msg, _rcpt(row[15:])))
            return out

        return self._read(tx)  # type: ignore[no-any-return]

    def stats(self) -> Deferred[tuple[int, float | None]]:
        """In one read: (recipients queued, when the oldest message still queued was
        queued). Counts every queued row: for the metrics scrape, not the queue run."""

        def tx(cur: Cursor) -> tuple[int, float | None]:
            cur.execute(
                "SELECT COUNT(*), MIN(m.created_at) FROM outbound_rcpts r "
                "JOIN outbound m ON m.id = r.message_id WHERE r.status = 'queued'"
            )
            count, oldest = cur.fetchone()
            return int(count), oldest

        return self._read(tx)  # type: ignore[no-any-return]

    def next_due(self) -> Deferred[float | None]:
        """When the next attempt is due among the queued recipients not held: one
        step down the ``outbound_due`` index, whatever the backlog (``stats`` counts
        every queued row, which each queue run did until it grew with the backlog)."""

        def tx(cur: Cursor) -> float | None:
            cur.execute(
                "SELECT r.next_attempt_at FROM outbound_rcpts r "
                "JOIN outbound m ON m.id = r.message_id "
                "WHERE r.status = 'queued' AND m.held = 0 ORDER BY r.next_attempt_at LIMIT 1"
            )
            row = cur.fetchone()
            return None if row is None else float(row[0])

        return self._read(tx)  # type: ignore[no-any-return]

    def exists(self, message_id: str) -> Deferred[bool]:
        def tx(cur: Cursor) -> bool:
            cur.execute("SELECT 1 FROM outbound WHERE id = ?", (message_id,))
            return cur.fetchone() is not None

        return self._read(tx)  # type: ignore[no-any-return]

    def record(
        self,
        message_id: str,
        updates: Sequence[Update],
        attempts: Sequence[AttemptRecord],
        now: float,
    ) -> Deferred[None]:
        """The results of one attempt, in one transaction. A recipient already final (a
        delete from the CLI meanwhile) keeps its status."""

        def tx(cur: Cursor) -> None:
            for u in updates:
                cur.execute(
                    "UPDATE outbound_rcpts SET status = ?, attempts = attempts + 1, "
                    "next_attempt_at = ?, reply = ?, smtp_status = ?, remote_mta = ?, tls = ?, "
                    "report = COALESCE(?, report), "
                    "delay_notices = delay_notices + ?, "
                    "last_delay_notice = CASE WHEN ? THEN ? ELSE last_delay_notice END, "
                    "updated_at = ? WHERE message_id = ? AND n = ? AND status = 'queued'",
                    (
                        u.status,
                        u.next_attempt_at,
                        u.reply,
                        u.smtp_status,
                        u.remote_mta,
                        None if u.tls is None else int(u.tls),
                        u.report,
                        int(u.delay_notice),
                        u.delay_notice,
                        now,
                        now,
                        message_id,
                        u.n,
                    ),
                )
            cur.executemany(
                "INSERT INTO outbound_attempts (message_id, n, started_at, duration, outcome, "
                "reply, remote_mta, tls) VALUES (?,?,?,?,?,?,?,?)",
                [
                    (
                        message_id,
                        a.n,
                        a.started_at,
                        a.duration,
                        a.outcome,
                        a.reply,
                        a.remote_mta,
                        None if a.tls is None else int(a.tls),
                    )
                    for a in attempts
                ],
            )

        return self._run(tx)  # type: ignore[no-any-return]

    def pending_reports(self) -> Deferred[list[tuple[QueuedMessage, list[RecipientState]]]]:
        def tx(cur: Cursor) -> list[tuple[QueuedMessage, list[RecipientState]]]:
            cur.execute(
                f"SELECT {_MESSAGE_COLUMNS}, {_RCPT_COLUMNS} FROM outbound_rcpts r "  # noqa: S608 - constant column lists
                "JOIN outbound m ON m.id = r.message_id "
                "LEFT JOIN accounts a ON a.id = m.account_id "
                "WHERE r.report IS NOT NULL ORDER BY r.message_id, r.n LIMIT 500"
            )
            out: dict[str, tuple[QueuedMessage, list[RecipientState]]] = {}
            for row in cur.fetchall():
                msg = _message(row[:15])
                out.setdefault(msg.id, (msg, []))[1].append(_rcpt(row[15:]))
            return list(out.values())

        return self._read(tx)  # type: ignore[no-any-return]

    def clear_reports(self, message_id: str, ns: Sequence[int]) -> Deferred[bool]:
        """Reports sent; True when the message has nothing left to do (its file can go)."""

        def tx(cur: Cursor) -> bool:
            cur.executemany(
                "UPDATE outbound_rcpts SET report = NULL WHERE message_id = ? AND n = ?",
                [(message_id, n) for n in ns],
            )
            return _finished(cur, message_id)

        return self._run(tx)  # type: ignore[no-any-return]

    def finished(self, message_id: str) -> Deferred[bool]:
        return self._read(_finished, message_id)  # type: ignore[no-any-return]

    def known(self, ids: Sequence[str]) -> Deferred[set[str]]:
        """Which of ``ids`` are queued messages with work left (for the file sweep)."""

        def tx(cur: Cursor) -> set[str]:
            return {i for i in ids if not _finished(cur, i, missing=True)}

        return self._read(tx)  # type: ignore[no-any-return]

    # --- inspection and administration (API and CLI) ---

    def get(
        self, message_id: str, account_id: int | None = None
    ) -> Deferred[tuple[QueuedMessage, list[RecipientState], list[AttemptRecord]]]:
        def tx(cur: Cursor) -> tuple[QueuedMessage, list[RecipientState], list[AttemptRecord]]:
            cur.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM outbound m "  # noqa: S608 - constant column lists
                "LEFT JOIN accounts a ON a.id = m.account_id WHERE m.id = ?",
                (message_id,),
            )
            row = cur.fetchone()
            if row is None or (account_id is not None and row[14] != account_id):
                raise NotFound(message_id)
            cur.execute(
                f"SELECT {_RCPT_COLUMNS} FROM outbound_rcpts r WHERE r.message_id = ? ORDER BY r.n",  # noqa: S608 - constant column lists
                (message_id,),
            )
            rcpts = [_rcpt(r) for r in cur.fetchall()]
            cur.execute(
                "SELECT n, started_at, duration, outcome, reply, remote_mta, tls "
                "FROM outbound_attempts WHERE message_id = ? ORDER BY id",
                (message_id,),
            )
            attempts = [
                AttemptRecord(
                    n=a[0],
                    started_at=a[1],
                    duration=a[2],
                    outcome=a[3],
                    reply=a[4],
                    remote_mta=a[5],
                    tls=None if a[6] is None else bool(a[6]),
                )
                for a in cur.fetchall()
            ]
            return _message(row), rcpts, attempts

        return self._read(tx)  # type: ignore[no-any-return]

    def list_queued(self, limit: int = 1000) -> Deferred[list[dict[str, Any]]]:
        def tx(cur: Cursor) -> list[dict[str, Any]]:
            cur.execute(
                "SELECT m.id, m.sender, m.size, m.created_at, m.held, "
                "COUNT(*), MIN(r.next_attempt_at), MAX(r.reply) FROM outbound m "
                "JOIN outbound_rcpts r ON r.message_id = m.id AND r.status = 'queued' "
                "GROUP BY m.id ORDER BY m.created_at LIMIT ?",
                (limit,),
            )
            return [
                {
                    "id": row[0],
                    "sender": row[1],
                    "size": row[2],
                    "queued_at": row[3],
                    "held": bool(row[4]),
                    "recipients": row[5],
                    "next_attempt_at": row[6],
                    "last_reply": row[7],
                }
                for row in cur.fetchall()
            ]

        return self._read(tx)  # type: ignore[no-any-return]

    def _admin(self, sql: str, message_id: str | None, now: float) -> Deferred[int]:
        def tx(cur: Cursor) -> int:
            if message_id is None:
                cur.execute(sql.replace("{where}", "1"), (now,))
            else:
                cur.execute(sql.replace("{where}", "message_id = ?"), (now, message_id))
            return cur.rowcount

        return self._run(tx)  # type: ignore[no-any-return]

    def flush(self, message_id: str | None, now: float) -> Deferred[int]:
        """Try now: every queued recipient (of one message, or all)."""
        return self._admin(
            "UPDATE outbound_rcpts SET next_attempt_at = ? WHERE status = 'queued' AND {where}",
            message_id,
            now,
        )

    def delete(self, message_id: str | None, now: float) -> Deferred[int]:
        """Stop delivering (no report: the operator decided, as Postfix's postsuper -d)."""
        return self._admin(
            "UPDATE outbound_rcpts SET status = 'deleted', next_attempt_at = NULL, "
            "updated_at = ? WHERE status = 'queued' AND {where}",
            message_id,
            now,
        )

    def hold(self, message_id: str | None, held: bool) -> Deferred[int]:
        def tx(cur: Cursor) -> int:
            if message_id is None:
                cur.execute("UPDATE outbound SET held = ?", (int(held),))
            else:
                cur.execute("UPDATE outbound SET held = ? WHERE id = ?", (int(held), message_id))
            return cur.rowcount

        return self._run(tx)  # type: ignore[no-any-return]


def _finished(cur: Cursor, message_id: str, missing: bool = False) -> bool:
    cur.execute(
        "SELECT COUNT(*), SUM(status = 'queued' OR report IS NOT NULL) FROM outbound_rcpts "
        "WHERE message_id = ?",
        (message_id,),
    )
    total, open_ = cur.fetchone()
    if total == 0:
        return missing
    return not open_
