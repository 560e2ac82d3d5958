"""Group commit (gehirn_ts/groupcommit.py): what comes in while a job runs goes as one
job after it; each item gets its own outcome. And the spool and the KVS using it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial import unittest

from gehirn_ts.groupcommit import DirectorySync, GroupCommit, Outcomes
from gehirn_ts.mta.spool import Spool
from tests.support import inline, recording_workers, spooled_envelope


class HeldThreads:
    """A ThreadRunner whose jobs run when the test says so (``finish``)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def run(self, fn: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((fn, args, d))
        return d

    def finish(self, n: int = 0) -> None:
        fn, args, d = self.jobs[n]
        try:
            d.callback(fn(*args))
        except Exception:
            d.errback(Failure())


class Bad(Exception):
    pass


def record(seen: list[list[str]]) -> Any:
    def work(items: list[str]) -> Outcomes:
        seen.append(list(items))
        return [(False, Bad(item)) if item.startswith("bad") else (True, item) for item in items]

    return work


class GroupCommitTests(unittest.TestCase):
    def test_what_comes_in_while_a_job_runs_goes_as_one_job_after_it(self) -> None:
        threads, seen = HeldThreads(), []
        group: GroupCommit[str] = GroupCommit(threads, record(seen))
        first = group.submit("a")
        assert len(threads.jobs) == 1  # a lone item goes at once
        later = [group.submit(x) for x in ("b", "c", "d")]
        assert len(threads.jobs) == 1  # no second job while the first runs
        threads.finish(0)
        assert seen == [["a"]]
        assert self.successResultOf(first) == "a"
        assert not any(d.called for d in later)  # theirs is the next job
        assert len(threads.jobs) == 2
        threads.finish(1)
        assert seen == [["a"], ["b", "c", "d"]]
        assert [self.successResultOf(d) for d in later] == ["b", "c", "d"]

    def test_an_item_that_failed_fails_alone(self) -> None:
        threads, seen = HeldThreads(), []
        group: GroupCommit[str] = GroupCommit(threads, record(seen))
        group.submit("a")
        results = [group.submit(x) for x in ("b", "bad1", "c")]
        threads.finish(0)
        threads.finish(1)
        assert self.successResultOf(results[0]) == "b"
        self.failureResultOf(results[1], Bad)
        assert self.successResultOf(results[2]) == "c"

    def test_a_job_that_raised_fails_its_items_and_the_next_still_runs(self) -> None:
        threads = HeldThreads()
        calls: list[list[str]] = []

        def work(items: list[str]) -> Outcomes:
            calls.append(items)
            if len(calls) == 1:
                raise OSError(5, "Input/output error")
            return [(True, None)] * len(items)

        group: GroupCommit[str] = GroupCommit(threads, work)
        both = [group.submit("a")]
        threads.finish(0)
        self.failureResultOf(both[0], OSError)
        again = group.submit("b")  # not stuck after a failed job
        threads.finish(1)
        assert self.successResultOf(again) is None and calls == [["a"], ["b"]]

    def test_an_item_submitted_by_a_callback_goes_in_the_next_job(self) -> None:
        threads, seen = HeldThreads(), []
        group: GroupCommit[str] = GroupCommit(threads, record(seen))
        chained: list[Deferred[None]] = []
        group.submit("a").addCallback(lambda _: chained.append(group.submit("z")))
        threads.finish(0)
        assert len(threads.jobs) == 2 and not chained[0].called
        threads.finish(1)
        assert seen == [["a"], ["z"]] and self.successResultOf(chained[0]) == "z"

    def test_a_job_takes_at_most_max_batch_items(self) -> None:
        threads, seen = HeldThreads(), []
        group: GroupCommit[str] = GroupCommit(threads, record(seen), max_batch=2)
        group.submit("a")
        rest = [group.submit(x) for x in "bcde"]
        threads.finish(0)
        threads.finish(1)
        assert not rest[2].called  # the third job's
        threads.finish(2)
        assert seen == [["a"], ["b", "c"], ["d", "e"]]
        assert [self.successResultOf(d) for d in rest] == ["b", "c", "d", "e"]

    def test_the_job_gets_the_extra_arguments_before_the_items(self) -> None:
        threads = HeldThreads()
        got: list[tuple[str, list[int]]] = []

        def work(where: str, items: list[int]) -> Outcomes:
            got.append((where, items))
            return [(True, None)] * len(items)

        group: GroupCommit[int] = GroupCommit(threads, work, "here")
        group.submit(1)
        threads.finish(0)
        assert got == [("here", [1])]


class DirectorySyncTests(unittest.TestCase):
    def test_a_sync_asked_while_one_runs_waits_for_an_fsync_that_began_after_it(self) -> None:
        threads = HeldThreads()
        synced: list[int] = []
        directory = self.mktemp()
        os.mkdir(directory)
        self.patch(os, "fsync", lambda fd: synced.append(fd))
        sync = DirectorySync(threads, directory)
        running = sync.sync()
        # A name made now may miss the fsync already on its way: this waits for the next.
        late = [sync.sync(), sync.sync()]
        threads.finish(0)
        assert self.successResultOf(running) is None and len(synced) == 1
        assert not any(d.called for d in late)
        threads.finish(1)
        assert [self.successResultOf(d) for d in late] == [None, None] and len(synced) == 2
        assert len(threads.jobs) == 2


class SpoolGroupTests(unittest.TestCase):
    @inline
    async def test_commits_that_come_in_together_share_a_job(self) -> None:
        workers, jobs = recording_workers(self)
        spool = Spool(Path(self.mktemp()), workers)
        incomings = [spool.begin() for _ in range(5)]
        for n, incoming in enumerate(incomings):
            incoming.write(b"Subject: %d\r\n\r\nbody\r\n" % n)
        commits = [incoming.commit(spooled_envelope(incoming)) for incoming in incomings]
        for d in commits:
            await d
        # The first at once; the four that came while it ran, together after it.
        assert [name for name, _ in jobs] == ["_commit_files", "_commit_files"]
        assert sorted(e.queue_id for e in spool.pending()) == sorted(i.queue_id for i in incomings)
        assert list(spool.tmp.iterdir()) == []

    @inline
    async def test_a_commit_whose_fsync_failed_fails_alone(self) -> None:
        workers, _jobs = recording_workers(self)
        spool = Spool(Path(self.mktemp()), workers)
        incomings = [spool.begin() for _ in range(3)]
        for incoming in incomings:
            incoming.write(b"Subject: x\r\n\r\nbody\r\n")
        bad_name = os.path.basename(incomings[1].path)
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            if os.readlink(f"/proc/self/fd/{fd}").endswith(bad_name):
                raise OSError(5, "Input/output error")
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        commits = [incoming.commit(spooled_envelope(incoming)) for incoming in incomings]
        results = []
        for d in commits:
            try:
                await d
                results.append("ok")
            except OSError:
                results.append("failed")
        assert results == ["ok", "failed", "ok"]
        incomings[1].discard()  # as the session does before its 451
        pending = sorted(e.queue_id for e in spool.pending())
        assert pending == sorted([incomings[0].queue_id, incomings[2].queue_id])
        assert list(spool.tmp.iterdir()) == []
