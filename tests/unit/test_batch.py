"""Group commit (store/batch.py): each interaction atomic, savepoints only where needed."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.trial import unittest

from gehirn_ts.store.batch import BatchedDatabase
from gehirn_ts.store.schema import CACHE_KIB
from tests.support import inline, sleep


class Boom(Exception):
    pass


def insert(cur: sqlite3.Cursor, value: str, fail: bool = False) -> str:
    cur.execute("INSERT INTO t (v) VALUES (?)", (value,))
    if fail:
        raise Boom(value)
    return value


def count(cur: sqlite3.Cursor, fail: bool = False) -> int:
    cur.execute("SELECT COUNT(*) FROM t")
    if fail:
        raise Boom("read")
    return int(cur.fetchone()[0])


def insert_many(cur: sqlite3.Cursor, values: list[str]) -> list[str]:
    """A merged interaction: one statement for all its items; ``bad`` fails."""
    calls.append(list(values))
    cur.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in values])
    if "bad" in values:
        raise Boom("bad")
    return [v.upper() for v in values]


calls: list[list[str]] = []


class BatchTests(unittest.TestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (v TEXT)")
        conn.commit()
        conn.close()
        self.writer = BatchedDatabase(self.path)
        self.reader = BatchedDatabase(self.path, readonly=True)
        self.addCleanup(self.reader.close)
        self.addCleanup(self.writer.close)
        self.statements: list[str] = []
        calls.clear()

    def _trace(self, db: BatchedDatabase) -> None:
        db._connection().set_trace_callback(self.statements.append)

    def _rows(self) -> list[str]:
        conn = sqlite3.connect(self.path)
        try:
            return [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")]
        finally:
            conn.close()

    @inline
    async def test_a_failing_write_alone_leaves_nothing_and_takes_no_savepoint(self) -> None:
        self._trace(self.writer)
        assert await self.writer.run(insert, "a") == "a"
        with self.assertRaises(Boom):
            await self.writer.run(insert, "b", True)
        assert self._rows() == ["a"]
        assert not [s for s in self.statements if "SAVEPOINT" in s]

    @inline
    async def test_in_a_batch_of_writes_only_the_failing_one_is_rolled_back(self) -> None:
        self._trace(self.writer)
        # The first run starts a batch of one; the three after it wait and share the next.
        results: list[Any] = await DeferredList(
            [
                self.writer.run(insert, "first"),
                self.writer.run(insert, "x"),
                self.writer.run(insert, "y", True),
                self.writer.run(insert, "z"),
            ],
            consumeErrors=True,
        )
        assert [ok for ok, _ in results] == [True, True, False, True]
        assert results[2][1].check(Boom)
        assert self._rows() == ["first", "x", "z"]
        assert sum("SAVEPOINT" in s for s in self.statements) == 3

    @inline
    async def test_merged_interactions_queued_together_run_as_one_call(self) -> None:
        self._trace(self.writer)
        results = await DeferredList(
            [
                self.writer.run(insert, "first"),  # a batch of its own; the rest wait
                self.writer.run_merged(insert_many, "a"),
                self.writer.run_merged(insert_many, "b"),
                self.writer.run_merged(insert_many, "c"),
                self.writer.run(insert, "plain"),
                self.writer.run_merged(insert_many, "d"),
            ]
        )
        assert [value for _, value in results] == ["first", "A", "B", "C", "plain", "D"]
        # Merged only next to each other: what was queued between keeps its place.
        assert calls == [["a", "b", "c"], ["d"]]
        assert self._rows() == ["a", "b", "c", "d", "first", "plain"]
        # One savepoint for the three merged ones, one each for the others.
        assert sum("SAVEPOINT" in s for s in self.statements) == 3

    @inline
    async def test_a_failing_merged_item_fails_alone(self) -> None:
        results: list[Any] = await DeferredList(
            [
                self.writer.run(insert, "first"),
                self.writer.run_merged(insert_many, "a"),
                self.writer.run_merged(insert_many, "bad"),
                self.writer.run_merged(insert_many, "c"),
            ],
            consumeErrors=True,
        )
        assert [ok for ok, _ in results] == [True, True, False, True]
        assert results[2][1].check(Boom)
        # Together first (rolled back), then each alone.
        assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]
        assert self._rows() == ["a", "c", "first"]

    @inline
    async def test_a_merged_call_that_miscounts_its_values_changes_nothing(self) -> None:
        def short(cur: sqlite3.Cursor, values: list[str]) -> list[str]:
            cur.executemany("INSERT INTO t (v) VALUES (?)", [(v,) for v in values])
            return values[:1]

        results: list[Any] = await DeferredList(
            [
                self.writer.run(insert, "first"),
                self.writer.run_merged(short, "a"),
                self.writer.run_merged(short, "b"),
            ],
            consumeErrors=True,
        )
        # Each alone then counts right: nothing is written twice.
        assert [value for _, value in results] == ["first", "a", "b"]
        assert self._rows() == ["a", "b", "first"]

    @inline
    async def test_reads_take_no_savepoint_and_a_failing_read_spoils_no_other(self) -> None:
        await self.writer.run(insert, "a")
        self._trace(self.reader)
        results: list[Any] = await DeferredList(
            [self.reader.run(count), self.reader.run(count, True), self.reader.run(count)],
            consumeErrors=True,
        )
        assert [ok for ok, _ in results] == [True, False, True]
        assert results[0][1] == results[2][1] == 1
        assert not [s for s in self.statements if "SAVEPOINT" in s]

    @inline
    async def test_every_connection_keeps_a_bounded_page_cache(self) -> None:
        # SQLite's default is 2 MiB a connection; the daemon's are smaller (RSS).
        def cache(cur: sqlite3.Cursor) -> int:
            return int(cur.execute("PRAGMA cache_size").fetchone()[0])

        assert await self.writer.run(cache) == -CACHE_KIB
        assert await self.reader.run(cache) == -CACHE_KIB
        assert CACHE_KIB < 2000

    def _other_process_writes(self) -> sqlite3.Connection:
        """A connection of its own (as a second node's) holding the write lock."""
        other = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t (v) VALUES ('other')")
        self.addCleanup(other.close)
        return other

    @inline
    async def test_a_write_waits_for_another_connection_s_lock_then_commits(self) -> None:
        other = self._other_process_writes()
        written = self.writer.run(insert, "mine")
        await sleep(0.3)
        assert not written.called  # still trying for the lock
        other.execute("COMMIT")
        assert await written == "mine"
        assert self._rows() == ["mine", "other"]

    @inline
    async def test_a_write_gives_up_when_the_lock_stays_taken(self) -> None:
        self.writer.busy_seconds = 0.3
        other = self._other_process_writes()
        reactor.callLater(2.0, other.execute, "COMMIT")  # SQLite alone would wait for this
        with self.assertRaises(sqlite3.OperationalError) as raised:
            await self.writer.run(insert, "mine")
        assert "locked" in str(raised.exception)
        await sleep(2.2)
        assert self._rows() == ["other"]
        # The lock is free again: the next batch goes through.
        assert await self.writer.run(insert, "later") == "later"
