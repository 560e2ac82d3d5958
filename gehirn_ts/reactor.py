"""The daemon's reactor: Twisted's epoll reactor without a log context for each event.

For every ready descriptor Twisted's reactor calls it through
``twisted.python.log.callWithLogger``: the descriptor's ``logPrefix()``, two dict copies
and a context pushed and popped, so that a legacy ``log.msg`` inside the handler is
tagged with the connection. gehirn-ts logs through ``twisted.logger``, whose events do
not read that context. A received message takes about eight such events (accept, each
command's read, the thread pipe's wake-ups); without the context its CPU fell by 1.6%
(docs/performance.md). What still holds: an exception out of a handler is logged and
the loop goes on, as ``callWithLogger`` did.

Installed by ``gehirn-tsd`` (``gehirn_ts.launcher``; not when twistd's ``--reactor``
names one) and by the SMTP worker processes.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import epollreactor
from twisted.internet.main import installReactor

from gehirn_ts.logs import Logger

log = Logger()


class EPollReactor(epollreactor.EPollReactor):  # type: ignore[misc]
    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait until something is ready
        try:
            # As Twisted's: at most as many events as descriptors watched.
            ready = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue  # removed by a handler earlier in this round
            try:
                # It logs and disconnects a selectable whose handler raises; this is
                # the net for anything beyond that.
                handle(selectable, fd, event)
            except Exception:
                log.failure(
                    "handling a ready descriptor failed: {selectable!r}", selectable=selectable
                )

    doIteration = doPoll


def install() -> Any:
    """Make this the reactor of the process (before anything imports another)."""
    reactor = EPollReactor()
    installReactor(reactor)
    return reactor
