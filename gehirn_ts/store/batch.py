"""Group commit for SQLite: interactions queued while one commit is in flight share the next.

Every commit is fsync'd (synchronous=FULL), so one transaction per write caps a busy
daemon at the disk's fsync rate. Here each interaction still runs atomically (inside
its own SAVEPOINT, rolled back alone if it raises) and its Deferred still fires only
after the commit that made it durable; but the writes that arrive together are
committed, and fsync'd, together.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gehirn_ts.groupcommit import GroupCommit, Outcomes
from gehirn_ts.store.schema import configure
from gehirn_ts.threads import Workers

T = TypeVar("T")
MAX_BATCH = 256
# How long the writer tries to take the write lock from another process (a second node
# on the same store) before its batch fails, and how often it tries.
BUSY_SECONDS = 10.0
BUSY_POLL = 0.001

Interaction = Callable[..., Any]


class BatchedDatabase:
    """One SQLite connection, used from one worker thread, with group commit."""

    def __init__(self, path: Path, reactor: Any = None, *, readonly: bool = False) -> None:
        # A reader runs deferred transactions on its own connection: in WAL mode it sees
        # every commit made before it starts and never waits for the writer's fsync.
        self._readonly = readonly
        self.busy_seconds = BUSY_SECONDS
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self._path = path
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._thread = Workers(reactor, f"sqlite:{path.name}{':r' if readonly else ''}")
        self._group: GroupCommit[tuple[Interaction, tuple[Any, ...]]] = GroupCommit(
            self._thread, self._execute, max_batch=MAX_BATCH
        )
        # Transactions begun so far (counted in the worker thread): what an interaction
        # reads of the database stays true until the next one, since no other writer
        # can commit while this connection holds the write lock.
        self.transactions = 0
        # Never leave the thread behind when the reactor stops without close().
        reactor.addSystemEventTrigger("during", "shutdown", self._stop_threads)

    def run(self, fn: Interaction, *args: Any) -> Deferred[Any]:
        """Run ``fn(cursor, *args)`` in a transaction; fires after it is committed."""
        if self._closed:
            d: Deferred[Any] = Deferred()
            d.errback(RuntimeError(f"database {self._path.name} is closed"))
            return d
        return self._group.submit((fn, args))

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            configure(self._conn)
            if not self._readonly:
                self._conn.execute("PRAGMA busy_timeout=0")  # _begin_writing waits instead
        return self._conn

    def _begin_writing(self, conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, tried every millisecond while another process holds the
        write lock. That process holds it for a whole group commit, fsync included, and
        SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms and more between its
        tries: a second node on the store waited up to twice as long as the lock was
        held (docs/performance.md, session 16)."""
        deadline = time.monotonic() + self.busy_seconds
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
            time.sleep(BUSY_POLL)

    def _execute(self, batch: list[tuple[Interaction, tuple[Any, ...]]]) -> Outcomes:
        """In the worker thread: one transaction, a savepoint per interaction where one
        is needed: a read changes nothing to roll back, and a write alone in its batch
        is rolled back with its transaction. Each statement lets go of the interpreter
        lock and waits to take it back while the reactor thread holds it; the two a
        savepoint adds were a share of the time a batch spent waiting
        (docs/performance.md)."""
        conn = self._connection()
        outcomes: Outcomes = []
        savepoints = not self._readonly and len(batch) > 1
        if self._readonly:
            conn.execute("BEGIN")
        else:
            self._begin_writing(conn)
        self.transactions += 1
        try:
            for fn, args in batch:
                cur = conn.cursor()
                if savepoints:
                    cur.execute("SAVEPOINT one")
                try:
                    value = fn(cur, *args)
                except Exception:
                    if savepoints:
                        cur.execute("ROLLBACK TO one")
                        cur.execute("RELEASE one")
                    outcomes.append((False, Failure()))
                else:
                    if savepoints:
                        cur.execute("RELEASE one")
                    outcomes.append((True, value))
                finally:
                    cur.close()
            if savepoints or self._readonly or outcomes[0][0]:
                conn.execute("COMMIT")
            else:
                conn.execute("ROLLBACK")  # the one write failed: none of it stays
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    def _stop_threads(self) -> None:
        self._thread.stop()

    def close(self) -> Deferred[None]:
        """Finish what is queued, then close the connection and the thread."""
        self._closed = True
        done: Deferred[None] = Deferred()

        def finish() -> None:
            if self._group.busy:
                self._reactor.callLater(0.01, finish)
                return
            if self._conn is not None:
                conn, self._conn = self._conn, None
                self._thread.run(conn.close)
            self._stop_threads()
            done.callback(None)

        finish()
        return done
