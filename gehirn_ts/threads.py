"""Worker threads for blocking calls, with a cheaper hand-off than Twisted's ThreadPool.

A job goes into the standard library's ``SimpleQueue`` (written in C) and its result
comes back through a wake-up of the reactor, once for all the results that came in
before the reactor thread took them: a write to the workers' own eventfd, which the
reactor watches (``reactor.callFromThread`` where the reactor watches no descriptors:
its wake-up took 5.4 us of a worker's time holding the interpreter lock, in Python,
against 0.4 us for an eventfd write).
Twisted's ThreadPool hands each job over through a Python ``Condition`` and its worker
team, which under load cost more CPU than many of the jobs themselves
(docs/performance.md). ``Workers(reactor, name)`` has one thread, which runs jobs one
at a time in order (a database connection's thread); more threads share the queue and
run jobs in parallel (fsyncs, checks that wait on DNS).

The threads start at the first job and are daemon threads: a stop that never came
(a start that failed half way) cannot keep the process alive, and what they do is
safe to cut short (every write commits by an atomic rename or an SQLite commit).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

T = TypeVar("T")


class ThreadRunner(Protocol):
    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]: ...


class ReactorThreads:
    """The reactor's own thread pool (``deferToThread``): the default where a component
    is given no ``Workers``."""

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThread(fn, *args)


REACTOR_THREADS = ReactorThreads()


class Workers:
    def __init__(self, reactor: Any, name: str, size: int = 1) -> None:
        self._reactor = reactor
        self._name = name
        self._size = size
        self._jobs: SimpleQueue[tuple[Callable[[], Any], Deferred[Any]] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stopped = False
        # Results wait here for the reactor thread; one wake-up brings all that came
        # in meanwhile.
        self._results: deque[tuple[Deferred[Any], bool, Any]] = deque()
        self._signalled = False
        self._wake: _Wake | None = None

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Call ``fn(*args)`` in a worker thread; the Deferred fires in the reactor thread."""
        d: Deferred[T] = Deferred()
        if self._stopped:
            d.errback(RuntimeError(f"the {self._name} threads are stopped"))
            return d
        if not self._threads:
            if IReactorFDSet.providedBy(self._reactor) and hasattr(os, "eventfd"):
                self._wake = _Wake(self._deliver)
                self._reactor.addReader(self._wake)
            self._threads = [
                threading.Thread(target=self._loop, name=f"{self._name}-{n}", daemon=True)
                for n in range(self._size)
            ]
            for t in self._threads:
                t.start()
        self._jobs.put(((lambda: fn(*args)) if args else fn, d))
        return d

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, d = item
            try:
                self._results.append((d, True, job()))
            except BaseException:
                self._results.append((d, False, Failure()))
            # The reactor clears the flag before it takes results, so a result added
            # after its last take always finds the flag clear and signals again.
            if not self._signalled:
                self._signalled = True
                if self._wake is not None:
                    self._wake.signal()
                else:
                    self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        """In the reactor thread: fire the Deferreds of every result that is in."""
        self._signalled = False
        results = self._results
        while results:
            d, ok, value = results.popleft()
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def stop(self) -> None:
        """Run what is queued, then end the threads (waits for them, as ThreadPool.stop)."""
        if self._stopped:
            return
        self._stopped = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        if self._wake is not None:
            self._reactor.removeReader(self._wake)
            self._wake.close()
            self._wake = None
            if self._results:
                # Results the reactor was not woken for yet: their Deferreds fire at
                # its next turn, as they would have.
                self._reactor.callFromThread(self._deliver)


@implementer(IReadDescriptor)
class _Wake:
    """An eventfd the reactor watches: a worker's write wakes it to fire results."""

    def __init__(self, deliver: Callable[[], None]) -> None:
        self._deliver = deliver
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def signal(self) -> None:
        """From a worker thread."""
        os.eventfd_write(self._fd, 1)

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        try:
            os.eventfd_read(self._fd)  # back to zero: one wake-up for all writes so far
        except BlockingIOError:
            pass
        self._deliver()

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "workers"

    def close(self) -> None:
        os.close(self._fd)
