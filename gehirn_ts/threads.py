"""Worker threads for blocking calls, with a cheaper hand-off than Twisted's ThreadPool.

A job goes into the standard library's ``SimpleQueue`` (written in C) and its result
comes back through ``reactor.callFromThread``, once for all the results that came in
before the reactor thread took them (each call writes to the reactor's wake-up pipe).
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

import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

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
        # Results wait here for the reactor thread; one callFromThread (a write to the
        # reactor's wake-up pipe) brings all that came in meanwhile.
        self._results: deque[tuple[Deferred[Any], bool, Any]] = deque()
        self._signalled = False

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """Call ``fn(*args)`` in a worker thread; the Deferred fires in the reactor thread."""
        d: Deferred[T] = Deferred()
        if self._stopped:
            d.errback(RuntimeError(f"the {self._name} threads are stopped"))
            return d
        if not self._threads:
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
