"""A bound on work in hand: at most ``n`` holders at once, the rest wait in turn.

Twisted's DeferredSemaphore does the same with a Deferred for every acquire, a free
slot's too: a take and release, awaited in a coroutine, measured 3.2 us with it and 0.4
here, on the path every event takes (session 16)."""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred


class Slots:
    def __init__(self, n: int) -> None:
        self._free = n
        self._waiting: deque[Deferred[None]] = deque()

    async def take(self) -> None:
        """Return once a slot is this caller's (at once when one is free)."""
        if self._free > 0:
            self._free -= 1
            return
        waiter: Deferred[None] = Deferred()
        self._waiting.append(waiter)
        await waiter  # a release hands its slot over

    def release(self) -> None:
        """Hand the slot to the first waiter, or free it."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.called:  # not one cancelled while it waited (a stopping bus)
                waiter.callback(None)
                return
        self._free += 1
