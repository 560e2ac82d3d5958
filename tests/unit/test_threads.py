"""Worker threads (gehirn_ts/threads.py): order, parallelism, errors, stop."""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from gehirn_ts.threads import REACTOR_THREADS, Workers
from tests.support import inline, recording_workers, spooled_envelope


class Boom(Exception):
    pass


class WorkersTests(unittest.TestCase):
    @inline
    async def test_one_thread_runs_jobs_in_order_off_the_reactor_and_errors_come_back(
        self,
    ) -> None:
        worker = Workers(reactor, "test")
        self.addCleanup(worker.stop)
        seen: list[tuple[int, bool]] = []

        def job(n: int) -> int:
            seen.append((n, threading.current_thread() is threading.main_thread()))
            return n * 2

        def bad() -> None:
            raise Boom("in the thread")

        results = [worker.run(job, n) for n in range(5)]
        failed = worker.run(bad)
        assert [await d for d in results] == [0, 2, 4, 6, 8]
        with self.assertRaises(Boom):
            await failed
        assert seen == [(n, False) for n in range(5)]

    @inline
    async def test_several_threads_run_jobs_at_once(self) -> None:
        workers = Workers(reactor, "test", 3)
        self.addCleanup(workers.stop)
        arrived = threading.Barrier(3, timeout=10)

        def meet() -> str:
            arrived.wait()  # passes only when three jobs run at the same time
            return threading.current_thread().name

        names = [await d for d in [workers.run(meet) for _ in range(3)]]
        assert sorted(names) == ["test-0", "test-1", "test-2"]

    def test_stop_runs_what_is_queued_first_and_then_refuses(self) -> None:
        worker = Workers(reactor, "test")
        ran: list[int] = []
        for n in range(3):
            worker.run(ran.append, n)
        worker.stop()
        assert ran == [0, 1, 2]
        worker.stop()  # a second stop is harmless
        refused = worker.run(ran.append, 4)
        self.failureResultOf(refused, RuntimeError)
        assert ran == [0, 1, 2]

    def test_results_that_come_in_together_share_one_wake_up(self) -> None:
        handed: list[tuple[Any, tuple[Any, ...]]] = []

        class HeldReactor:
            """Takes callFromThread calls and runs none until the test says so."""

            def callFromThread(self, f: Any, *args: Any) -> None:
                handed.append((f, args))

        workers = Workers(HeldReactor(), "test")
        results = [workers.run(lambda n=n: n) for n in range(5)]
        failed = workers.run(lambda: 1 / 0)
        workers.stop()  # all six jobs have run
        assert len(handed) == 1  # one wake-up of the reactor for six results
        f, args = handed[0]
        f(*args)
        assert [self.successResultOf(d) for d in results] == [0, 1, 2, 3, 4]
        self.failureResultOf(failed, ZeroDivisionError)

    @inline
    async def test_results_wake_the_reactor_through_the_workers_own_descriptor(self) -> None:
        class NoCallFromThread:
            """The reactor's descriptors, without callFromThread."""

            def addReader(self, reader: Any) -> None:
                reactor.addReader(reader)

            def removeReader(self, reader: Any) -> None:
                reactor.removeReader(reader)

            def callFromThread(self, f: Any, *args: Any) -> None:
                raise AssertionError("a wake-up through callFromThread")

        from twisted.internet.interfaces import IReactorFDSet
        from zope.interface import directlyProvides

        fake = NoCallFromThread()
        directlyProvides(fake, IReactorFDSet)
        workers = Workers(fake, "wake", 2)
        self.addCleanup(workers.stop)
        before = set(reactor.getReaders())
        results = [workers.run(lambda n=n: n * 3) for n in range(50)]
        assert [await d for d in results] == [n * 3 for n in range(50)]
        (added,) = [r for r in set(reactor.getReaders()) - before if r.logPrefix() == "workers"]
        workers.stop()
        assert added not in reactor.getReaders()  # the reactor no longer watches it

    def test_no_thread_starts_before_the_first_job(self) -> None:
        before = threading.active_count()
        workers = Workers(reactor, "idle", 4)
        assert threading.active_count() == before
        workers.stop()

    @inline
    async def test_the_reactor_pool_runner_calls_through(self) -> None:
        assert await REACTOR_THREADS.run(lambda a, b: a + b, 2, 3) == 5


class SpoolThreadsTests(unittest.TestCase):
    def _spool(self, workers: Any) -> Any:
        from pathlib import Path

        from gehirn_ts.mta.spool import Spool

        return Spool(Path(self.mktemp()), workers)

    @inline
    async def test_a_spool_hands_only_its_fsyncs_to_the_threads_it_was_given(self) -> None:
        workers, jobs = recording_workers(self)
        spool = self._spool(workers)
        incoming = spool.begin()
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        await incoming.commit(spooled_envelope(incoming))
        # The fsync of the message with its envelope and (after its rename) the
        # directory's: one job.
        assert jobs == [("_commit_files", "io-0")]
        assert [e.queue_id for e in spool.pending()] == [incoming.queue_id]
        assert spool.message_path(incoming.queue_id).read_bytes().endswith(b"body\r\n")
        assert list(spool.tmp.iterdir()) == []

    @inline
    async def test_a_commit_that_fails_leaves_nothing_to_process(self) -> None:

        workers = Workers(reactor, "io")
        self.addCleanup(workers.stop)
        spool = self._spool(workers)
        incoming = spool.begin()
        incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        run = workers.run

        def failing_dir_sync(fn: Any, *args: Any) -> Any:
            if fn.__name__ == "_commit_files":

                def eio(*args: Any) -> None:
                    # The renames done, then the directory's fsync fails.
                    fn("/nonexistent-directory", *args[1:])

                return run(eio, *args)
            return run(fn, *args)

        workers.run = failing_dir_sync  # type: ignore[method-assign]
        with self.assertRaises(OSError):
            await incoming.commit(spooled_envelope(incoming))
        incoming.discard()  # as the session does before its 451
        assert spool.pending() == []
        assert list(spool.incoming.iterdir()) == [] and list(spool.tmp.iterdir()) == []
