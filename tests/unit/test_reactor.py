"""gehirn_ts/reactor.py: Twisted's epoll reactor without a log context for each event."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from twisted.python import context
from twisted.python.failure import Failure
from twisted.python.log import ILogContext
from twisted.trial import unittest

from gehirn_ts.launcher import names_a_reactor
from gehirn_ts.reactor import EPollReactor


class _Reader:
    """A descriptor the reactor watches for reading."""

    def __init__(self, sock: socket.socket, on_read: Any = None) -> None:
        self.sock = sock
        self.reads = 0
        self.lost: list[Failure] = []
        self._on_read = on_read

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> None:
        self.reads += 1
        self.sock.recv(100)
        if self._on_read is not None:
            self._on_read()

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class EPollReactorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self._close)
        self.sockets: list[socket.socket] = []

    def _close(self) -> None:
        self.reactor.removeAll()
        self.reactor._poller.close()
        self.reactor.waker.connectionLost(None)
        for s in self.sockets:
            s.close()

    def _ready_reader(self, on_read: Any = None) -> _Reader:
        ours, theirs = socket.socketpair()
        self.sockets += [ours, theirs]
        theirs.send(b"x")
        reader = _Reader(ours, on_read)
        self.reactor.addReader(reader)
        return reader

    def test_each_ready_descriptor_is_handled(self) -> None:
        readers = [self._ready_reader() for _ in range(3)]
        self.reactor.doIteration(0)
        assert [r.reads for r in readers] == [1, 1, 1]

    def test_no_log_context_is_made_for_an_event(self) -> None:
        # Twisted's reactor pushes {"system": logPrefix()} around every handler call;
        # this one does not (the cost this module saves).
        seen: list[object] = []
        self._ready_reader(lambda: seen.append(context.get(ILogContext).get("system")))
        self.reactor.doPoll(0)
        assert seen == ["-"]

    def test_a_handler_that_raises_is_disconnected_and_the_rest_are_handled(self) -> None:
        def boom() -> None:
            raise ValueError("broken handler")

        bad = self._ready_reader(boom)
        good = self._ready_reader()
        self.reactor.doPoll(0)
        assert good.reads == 1 and not good.lost
        assert len(bad.lost) == 1 and bad.lost[0].check(ValueError)
        assert len(self.flushLoggedErrors(ValueError)) == 1

    def test_a_descriptor_removed_by_an_earlier_handler_is_not_handled(self) -> None:
        later: list[_Reader] = []
        first = self._ready_reader(lambda: self.reactor.removeReader(later[0]))
        later.append(self._ready_reader())
        self.reactor.doPoll(0)
        # epoll reports in no set order: whichever came first removed nothing handled
        # after it.
        if first.reads == 1:
            assert later[0].reads == 0
        assert first.reads == 1 or later[0].reads == 1

    def test_an_error_beyond_the_handler_is_logged_and_the_loop_goes_on(self) -> None:
        readers = [self._ready_reader() for _ in range(2)]
        handled: list[object] = []
        real = self.reactor._doReadOrWrite

        def fails_first(selectable: object, fd: int, event: int) -> None:
            handled.append(selectable)
            if len(handled) == 1:
                raise RuntimeError("beyond the handler")
            real(selectable, fd, event)

        self.reactor._doReadOrWrite = fails_first
        self.reactor.doPoll(0)
        assert len(handled) == 2
        assert sum(r.reads for r in readers) == 1  # the second one was handled
        assert len(self.flushLoggedErrors(RuntimeError)) == 1


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["-n", "gehirn-ts"], False),
        (["--reactor", "poll", "gehirn-ts"], True),
        (["--reactor=poll", "gehirn-ts"], True),
        (["-r", "select"], True),
        (["-rselect"], True),
        (["--rundir", "/tmp", "gehirn-ts"], False),
    ],
)
def test_gehirn_tsd_installs_its_reactor_unless_one_is_named(argv: list[str], named: bool) -> None:
    assert names_a_reactor(argv) is named
