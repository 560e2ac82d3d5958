"""The embedded bus: durable, in-process, one machine.

Messages live in their own SQLite file (WAL, fsync on commit); ``publish`` and
``send`` fire only after the commit. Each message row is deleted after its handler
succeeds (the ack), so whatever was not acked when the process died is delivered
again at the next start: at least once. The deletes of the acks that come in while
one delete is being written go together in the next one (one statement, not one
each); a message acked just before a crash may so be delivered once more, which at
least once allows. Which rows are ready, and when, is mirrored
in memory (a heap per queue), so no polling is needed.
"""

from __future__ import annotations

import heapq
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from gehirn_ts.events import Event, topic_matches
from gehirn_ts.interfaces import BusMessage, BusUnavailable, Handler, IEventBus, Requeue
from gehirn_ts.logs import Logger
from gehirn_ts.store.batch import BatchedDatabase

log = Logger()

_BODY_CACHE = 10_000
# Of those, how many also keep the published Event for the router (BusMessage.event): a
# backlog of parsed events costs more memory than their bytes.
_EVENT_CACHE = 1_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    ready_at REAL NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS bindings (
    queue TEXT NOT NULL,
    pattern TEXT NOT NULL,
    PRIMARY KEY (queue, pattern)
);
"""


@dataclass
class _Queue:
    ready: list[tuple[float, int, int]] = field(default_factory=list)  # (ready_at, id, attempt)
    inflight: set[int] = field(default_factory=set)
    handler: Handler | None = None
    timer: IDelayedCall | None = None


_ROUTES_CACHE = 1_000  # routing keys whose queues are kept
_DELETE_BATCH = 500  # ids in one DELETE (SQLite allows 32,766 parameters)


def _delete(cur: sqlite3.Cursor, ids: list[int]) -> None:
    marks = ",".join("?" * len(ids))
    cur.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)  # noqa: S608


def _query(cur: sqlite3.Cursor, sql: str, args: tuple[Any, ...]) -> list[Any]:
    cur.execute(sql, args)
    return cur.fetchall()


@implementer(IEventBus)
class LocalBus(Service):
    name = "bus"

    def __init__(
        self,
        path: Path,
        clock: IReactorTime,
        *,
        prefetch: int = 512,
        default_delay: float = 5.0,
        stop_grace: float = 15.0,
    ) -> None:
        self._path = path
        self._clock = clock
        self._prefetch = prefetch
        self._default_delay = default_delay
        self._stop_grace = stop_grace
        self._queues: dict[str, _Queue] = {}
        self._bindings: dict[str, set[str]] = {}
        self._routes: dict[str, list[str]] = {}  # routing key -> the queues bound to it
        self._db: BatchedDatabase | None = None
        self._dispatching: set[Deferred[None]] = set()
        self._started: Deferred[None] | None = None
        # (routing key, body) of messages stored by this process, so that dispatching
        # them needs no read; bounded, the rest is read back from the file.
        self._bodies: dict[int, tuple[str, bytes, Event | None]] = {}
        self._acked: list[int] = []
        self._deleting: Deferred[None] | None = None

    # --- lifecycle ---

    def startService(self) -> None:
        super().startService()
        self._started = Deferred.fromCoroutine(self._load())

    async def _load(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = BatchedDatabase(self._path)

        def tx(cur: sqlite3.Cursor) -> tuple[list[Any], list[Any]]:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)
            cur.execute("SELECT queue, pattern FROM bindings")
            bindings = cur.fetchall()
            cur.execute("SELECT queue, ready_at, id, attempt FROM messages")
            return bindings, cur.fetchall()

        bindings, rows = await self._db.run(tx)
        for queue, pattern in bindings:
            self._bindings.setdefault(queue, set()).add(pattern)
        self._routes.clear()
        for queue, ready_at, msg_id, attempt in rows:
            self._queue(queue).ready.append((ready_at, msg_id, attempt))
        for name, q in self._queues.items():
            heapq.heapify(q.ready)
            self._pump(name)

    async def _ready(self) -> BatchedDatabase:
        if self._started is None:
            raise BusUnavailable("the bus is not running")
        await self._started
        assert self._db is not None
        return self._db

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        for q in self._queues.values():
            if q.timer is not None and q.timer.active():
                q.timer.cancel()
            q.timer = None
        if self._dispatching:
            # Let handlers in flight finish; whatever they do not ack stays stored.
            pending = defer.DeferredList(list(self._dispatching), consumeErrors=True)
            pending.addTimeout(self._stop_grace, self._clock)
            try:
                await pending
            except defer.TimeoutError:
                log.warn("bus stopped with {n} messages unacked", n=len(self._dispatching))
        while self._deleting is not None:
            await self._deleting
        if self._started is not None:
            try:
                await self._started
            except Exception:
                log.failure("bus failed to start")
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    # --- IEventBus ---

    def bind(self, queue: str, patterns: Sequence[str]) -> Deferred[None]:
        # Effective at once for every later publish; stored for the next start.
        self._bindings.setdefault(queue, set()).update(patterns)
        self._routes.clear()
        return Deferred.fromCoroutine(self._bind(queue, list(patterns)))

    async def _bind(self, queue: str, patterns: list[str]) -> None:
        pool = await self._ready()

        def tx(cur: sqlite3.Cursor) -> None:
            cur.executemany(
                "INSERT OR IGNORE INTO bindings (queue, pattern) VALUES (?, ?)",
                [(queue, p) for p in patterns],
            )

        await pool.run(tx)

    def publish(self, event: Event) -> Deferred[None]:
        return self.publish_many([event])

    def publish_many(self, events: Sequence[Event]) -> Deferred[None]:
        # One interaction for all: a batch from the API was a coroutine, a savepoint
        # and a thread round trip an event.
        return Deferred.fromCoroutine(self._put_events(events))

    def send(self, queue: str, body: bytes, delay: float = 0.0) -> Deferred[None]:
        return Deferred.fromCoroutine(self._put(queue, queue, body, delay))

    def consume(self, queue: str, handler: Handler) -> None:
        q = self._queue(queue)
        if q.handler is not None:
            raise ValueError(f"queue {queue!r} has a consumer already")
        q.handler = handler
        self._pump(queue)

    # --- internals ---

    def _queue(self, name: str) -> _Queue:
        return self._queues.setdefault(name, _Queue())

    async def _put(self, queue: str, routing_key: str, body: bytes, delay: float) -> None:
        """Store a message for ``queue``."""
        pool = await self._ready()
        await self._store(pool, [(queue, routing_key, body, None)], delay)

    async def _put_events(self, events: Sequence[Event]) -> None:
        """Store each event for every queue bound to match its type."""
        pool = await self._ready()  # the stored bindings are loaded by then
        await self._store(
            pool,
            [
                (queue, event.type, event.to_json(), event)
                for event in events
                for queue in self._bound_to(event.type)
            ],
            0.0,
        )

    def _bound_to(self, routing_key: str) -> list[str]:
        queues = self._routes.get(routing_key)
        if queues is None:
            # Matched once per type until the bindings change: matching every pattern
            # for every event was a fortieth of an event's CPU.
            if len(self._routes) >= _ROUTES_CACHE:
                self._routes.clear()
            queues = self._routes[routing_key] = sorted(
                q
                for q, patterns in self._bindings.items()
                if any(topic_matches(p, routing_key) for p in patterns)
            )
        return queues

    async def _store(
        self,
        pool: BatchedDatabase,
        messages: list[tuple[str, str, bytes, Event | None]],
        delay: float,
    ) -> None:
        """Store (queue, routing key, body, event) messages in one interaction, then
        queue them."""
        if not self.running:
            raise BusUnavailable("the bus is stopping")
        ready_at = self._clock.seconds() + delay

        def tx(cur: sqlite3.Cursor) -> list[int]:
            ids = []
            for queue, routing_key, body, _ in messages:
                cur.execute(
                    "INSERT INTO messages (queue, routing_key, body, ready_at) VALUES (?,?,?,?)",
                    (queue, routing_key, body, ready_at),
                )
                assert cur.lastrowid is not None
                ids.append(cur.lastrowid)
            return ids

        ids = await pool.run(tx) if messages else []
        pumped = set()
        for (queue, routing_key, body, event), msg_id in zip(messages, ids, strict=True):
            self._remember(msg_id, routing_key, body, event)
            heapq.heappush(self._queue(queue).ready, (ready_at, msg_id, 1))
            pumped.add(queue)
        for queue in sorted(pumped):
            self._pump(queue)

    def _pump(self, name: str) -> None:
        q = self._queues[name]
        if q.handler is None or not self.running or self._db is None:
            return
        now = self._clock.seconds()
        while q.ready and len(q.inflight) < self._prefetch and q.ready[0][0] <= now:
            _, msg_id, attempt = heapq.heappop(q.ready)
            q.inflight.add(msg_id)
            d = Deferred.fromCoroutine(self._dispatch(name, q, msg_id, attempt))
            self._dispatching.add(d)
            d.addBoth(self._forget, d)
        if q.timer is not None and q.timer.active():
            q.timer.cancel()
        q.timer = None
        if q.ready and len(q.inflight) < self._prefetch:
            wait = max(q.ready[0][0] - now, 0.0)
            q.timer = self._clock.callLater(wait, self._pump, name)

    def _remember(self, msg_id: int, routing_key: str, body: bytes, event: Event | None) -> None:
        held = len(self._bodies)
        if held < _BODY_CACHE:
            self._bodies[msg_id] = (routing_key, body, event if held < _EVENT_CACHE else None)

    def _forget(self, result: object, d: Deferred[None]) -> None:
        self._dispatching.discard(d)

    async def _dispatch(self, name: str, q: _Queue, msg_id: int, attempt: int) -> None:
        db = self._db
        assert db is not None and q.handler is not None
        redeliver: float | None = None
        try:
            cached = self._bodies.pop(msg_id, None)
            if cached is None:
                row = await db.run(
                    _query, "SELECT routing_key, body FROM messages WHERE id = ?", (msg_id,)
                )
                if not row:
                    return
                cached = (row[0][0], bytes(row[0][1]), None)
            routing_key, body, event = cached
            message = BusMessage(name, body, routing_key, str(msg_id), attempt, event)
            try:
                await q.handler(message)
            except Requeue as r:
                redeliver = r.delay
            except Exception:
                log.failure("handler for queue {queue} failed; message requeued", queue=name)
                redeliver = self._default_delay
            if redeliver is None:
                self._ack(msg_id)
            else:
                ready_at = self._clock.seconds() + redeliver
                await db.run(
                    _query,
                    "UPDATE messages SET ready_at = ?, attempt = attempt + 1 WHERE id = ?",
                    (ready_at, msg_id),
                )
                self._remember(msg_id, routing_key, body, event)
                heapq.heappush(q.ready, (ready_at, msg_id, attempt + 1))
        except Exception:
            # The store failed (disk full, pool closed at shutdown): the message stays
            # stored and is delivered again at the next start.
            log.failure("bus could not settle message {id} of {queue}", id=msg_id, queue=name)
        finally:
            q.inflight.discard(msg_id)
            if name in self._queues:
                self._pump(name)

    def _ack(self, msg_id: int) -> None:
        self._acked.append(msg_id)
        if self._deleting is None:
            self._deleting = Deferred.fromCoroutine(self._delete_acked())

    async def _delete_acked(self) -> None:
        """Delete the acked rows, a batch at a time, until none is left."""
        try:
            while self._acked and self._db is not None:
                ids, self._acked = self._acked[:_DELETE_BATCH], self._acked[_DELETE_BATCH:]
                try:
                    await self._db.run(_delete, ids)
                except Exception:
                    # Not deleted: delivered again at the next start (at least once).
                    log.failure("bus could not delete {n} acked messages", n=len(ids))
        finally:
            self._deleting = None

    def depth(self, queue: str) -> int:
        """Messages in ``queue`` (ready, delayed or in flight)."""
        q = self._queues.get(queue)
        return 0 if q is None else len(q.ready) + len(q.inflight)
