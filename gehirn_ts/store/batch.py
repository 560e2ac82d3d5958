"""Group commit for SQLite: interactions queued while one commit is in flight share the next.

Every commit is fsync'd (synchronous=FULL), so one transaction per write caps a busy
daemon at the disk's fsync rate. Here each interaction still runs atomically (inside
its own SAVEPOINT, rolled back alone if it raises) and its Deferred still fires only
after the commit that made it durable; but the writes that arrive together are
committed, and fsync'd, together.

Interactions of one kind that arrive together can also run as one call
(``run_merged``): the events of a bus message routed in a few statements, not five
each (docs/performance.md, session 17).
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
# Called with a cursor and the items of the interactions merged into one call; returns
# each item's value, in order.
Merged = Callable[[sqlite3.Cursor, list[Any]], list[Any]]
# What the group commit queues: the interaction, its arguments, and whether it is a
# merged one (then ``args`` is its one item).
_Job = tuple[Callable[..., Any], tuple[Any, ...], bool]


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
        self._group: GroupCommit[_Job] = GroupCommit(
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
        return self._group.submit((fn, args, False))

    def run_merged(self, fn: Merged, item: Any) -> Deferred[Any]:
        """Like ``run``, for interactions that can run together: the merged calls
        queued next to each other (the same ``fn``) go in one ``fn(cursor, items)``,
        which returns each item's value in order. If that call raises, each item runs
        again alone, so one bad item fails alone."""
        if self._closed:
            return self.run(fn, [item])  # fails as ``run`` does once closed
        return self._group.submit((fn, (item,), True))

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

    def _execute(self, batch: list[_Job]) -> Outcomes:
        """In the worker thread: one transaction, a savepoint per interaction where one
        is needed: a read changes nothing to roll back, and a write alone in its batch
        is rolled back with its transaction. Each statement lets go of the interpreter
        lock and waits to take it back while the reactor thread holds it; the two a
        savepoint adds were a share of the time a batch spent waiting
        (docs/performance.md). Merged interactions next to each other run as one call,
        in one savepoint."""
        conn = self._connection()
        outcomes: Outcomes = []
        savepoints = not self._readonly and len(batch) > 1
        if self._readonly:
            conn.execute("BEGIN")
        else:
            self._begin_writing(conn)
        self.transactions += 1
        try:
            start = 0
            while start < len(batch):
                fn, args, merged = batch[start]
                end = start + 1
                while end < len(batch) and merged and batch[end][2] and batch[end][0] == fn:
                    end += 1
                if end - start == 1:
                    if merged:
                        outcomes.append(self._one(conn, savepoints, _first_of, fn, [args[0]]))
                    else:
                        outcomes.append(self._one(conn, savepoints, fn, *args))
                else:
                    items = [job[1][0] for job in batch[start:end]]
                    together = self._one(conn, savepoints, _all_of, fn, items)
                    if together[0]:
                        outcomes.extend((True, value) for value in together[1])
                    else:
                        # One item (or the call) failed: each alone, in its own savepoint.
                        outcomes.extend(
                            self._one(conn, savepoints, _first_of, fn, [item]) for item in items
                        )
                start = end
            if savepoints or self._readonly or outcomes[0][0]:
                conn.execute("COMMIT")
            else:
                conn.execute("ROLLBACK")  # the one write failed: none of it stays
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes

    @staticmethod
    def _one(
        conn: sqlite3.Connection, savepoint: bool, fn: Callable[..., Any], *args: Any
    ) -> tuple[bool, Any]:
        """``fn(cursor, *args)``, rolled back to where it began if it raises."""
        cur = conn.cursor()
        if savepoint:
            cur.execute("SAVEPOINT one")
        try:
            value = fn(cur, *args)
        except Exception:
            if savepoint:
                cur.execute("ROLLBACK TO one")
                cur.execute("RELEASE one")
            return (False, Failure())
        else:
            if savepoint:
                cur.execute("RELEASE one")
            return (True, value)
        finally:
            cur.close()

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


def _all_of(cur: sqlite3.Cursor, fn: Merged, items: list[Any]) -> list[Any]:
    """The values of merged interactions, one an item (else it raises, and what ``fn``
    did is rolled back)."""
    values = fn(cur, items)
    if len(values) != len(items):
        raise ValueError(f"{len(values)} values for {len(items)} merged interactions")
    return values


def _first_of(cur: sqlite3.Cursor, fn: Merged, items: list[Any]) -> Any:
    """A merged interaction's value for its one item."""
    (value,) = _all_of(cur, fn, items)
    return value
