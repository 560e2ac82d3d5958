"""Group commit: the fsyncs of many messages in one worker-thread job.

Each received message asked a worker thread for a job of its own (its file's fsync,
its rename, its directory's fsync), and later for another (the KVS directory's fsync).
Every job wakes a thread, and every system call in it gives the interpreter lock up
and takes it back: under load the threads' hand-offs (futex calls) were a seventh of
the daemon's CPU, more than any function of its own (docs/performance.md, session 14).
Here the work that arrives while a job runs waits for it to end and then goes as one
job: one wake-up and one directory fsync for all of it. One message alone goes at once,
as before. A job's fsyncs run one after another: with a journal (ext4's default, XFS)
the first commits it for the files written before it and the rest find their data
there; on ext4 without a journal each writes its own, and a job of many takes longer
than the same fsyncs side by side in ten threads. Receiving, limited by the reactor
thread's CPU, gains; sending, where an API request waits for its file's fsync, keeps a
job a message (docs/decisions.md, "Group commit").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gehirn_ts.threads import ThreadRunner

T = TypeVar("T")

# What a job returns: for each item in order, (True, its value) or (False, what it
# failed with: an exception or a Failure).
Outcomes = list[tuple[bool, Any]]


class Group(Generic[T]):
    """``submit(item)`` fires with the item's value when ``start(items)`` has run over a
    list that holds ``item``; one call at a time, over the items submitted while the
    call before it ran (at most ``max_batch``). ``start`` returns a Deferred of each
    item's outcome; one that fails fails all its items."""

    def __init__(
        self, start: Callable[[list[T]], Deferred[Outcomes]], max_batch: int | None = None
    ) -> None:
        self._start = start
        self._max = max_batch
        self.busy = False
        self._items: list[T] = []
        self._waiters: list[Deferred[Any]] = []

    @property
    def waiting(self) -> int:
        """How many items wait for the call under way to end."""
        return len(self._items)

    def submit(self, item: T) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._items.append(item)
        self._waiters.append(d)
        if not self.busy:
            self._next()
        return d

    def _next(self) -> None:
        if not self._items:
            self.busy = False
            return
        self.busy = True
        n = len(self._items) if self._max is None else self._max
        items, self._items = self._items[:n], self._items[n:]
        waiters, self._waiters = self._waiters[:n], self._waiters[n:]
        self._start(items).addBoth(self._done, waiters)

    def _done(self, outcomes: Outcomes | Failure, waiters: list[Deferred[Any]]) -> None:
        # The callbacks first: what they submit goes with the next job.
        for n, d in enumerate(waiters):
            if isinstance(outcomes, Failure):
                d.errback(outcomes)
                continue
            ok, value = outcomes[n]
            if ok:
                d.callback(value)
            else:
                d.errback(value if isinstance(value, Failure) else Failure(value))
        self._next()


class GroupCommit(Group[T]):
    """A ``Group`` whose call is ``work(*args, items)`` in a thread. The store's SQLite
    group commit (``store/batch.py``) is one."""

    def __init__(
        self,
        threads: ThreadRunner,
        work: Callable[..., Outcomes],
        *args: object,
        max_batch: int | None = None,
    ) -> None:
        super().__init__(lambda items: threads.run(work, *args, items), max_batch)


def fsync_directory(path: str) -> None:
    """The directory's entries (new names, renames, links) on disk (blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySync:
    """``sync()`` fires after an fsync of the directory that began after the call, so
    every name made in it before the call is on disk; calls while one runs share the
    next."""

    def __init__(self, threads: ThreadRunner, path: str) -> None:
        self._group: GroupCommit[None] = GroupCommit(threads, _sync_directory, path)

    def sync(self) -> Deferred[None]:
        return self._group.submit(None)


def _sync_directory(path: str, items: list[None]) -> Outcomes:
    fsync_directory(path)
    return [(True, None)] * len(items)
