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
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from gehirn_ts.threads import ThreadRunner

T = TypeVar("T")

# What a job returns: for each item in order, None (done) or what it failed with.
Outcomes = list[BaseException | None]


class GroupCommit(Generic[T]):
    """``submit(item)`` fires when ``work(*args, items)`` has run over a list that holds
    ``item``; ``work`` runs in a thread, one job at a time, over every item submitted
    while the job before it ran. A job that raises fails all its items."""

    def __init__(self, threads: ThreadRunner, work: Callable[..., Outcomes], *args: object) -> None:
        self.threads = threads
        self._work = work
        self._args = args
        self._running = False
        self._items: list[T] = []
        self._waiters: list[Deferred[None]] = []

    def submit(self, item: T) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._items.append(item)
        self._waiters.append(d)
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        self._running = True
        job = self.threads.run(self._work, *self._args, items)
        job.addBoth(self._done, waiters)

    def _done(self, outcomes: Outcomes | Failure, waiters: list[Deferred[None]]) -> None:
        self._running = False
        if self._items:
            self._start()  # before the callbacks: they may submit again
        for n, d in enumerate(waiters):
            if isinstance(outcomes, Failure):
                d.errback(outcomes)
            elif (error := outcomes[n]) is not None:
                d.errback(Failure(error))
            else:
                d.callback(None)


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
    return [None] * len(items)
