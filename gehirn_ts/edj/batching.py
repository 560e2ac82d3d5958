"""Attempts to one batch subscription, gathered into one request.

A subscription with ``batch`` above 1 takes its events in CloudEvents' batched mode.
Every attempt (first ones from routing, retries from the deliver queue) asks here; the
attempts to the same subscription that ask in the same reactor turn, up to ``batch`` of
them, go in one request, and its result is each one's. Nothing waits for a batch to
fill: the events a turn brings (routing settles a whole store batch at once) are what
goes. Each delivery is then settled on its own, as an attempt of its own would be
(retries, attempt log, metrics), so a batch adds no state to the store or the bus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from gehirn_ts.events import Event
from gehirn_ts.interfaces import Result

Send = Callable[[Sequence[Event], Sequence[bytes]], Deferred[Result]]


@dataclass
class _Open:
    send: Send
    size: int
    call: IDelayedCall | None = None
    items: list[tuple[Event, bytes, Deferred[Result]]] = field(default_factory=list)


class Batches:
    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._open: dict[str, _Open] = {}

    def attempt(
        self, key: str, size: int, send: Send, event: Event, body: bytes
    ) -> Deferred[Result]:
        """The result of the request that carries ``event`` (rendered as ``body``) with
        the others asked for ``key`` in this turn; ``send`` makes that request."""
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Open(send, size)
            batch.call = self._clock.callLater(0, self._flush, key)
        d: Deferred[Result] = Deferred()
        batch.items.append((event, body, d))
        if len(batch.items) >= batch.size:
            if batch.call is not None and batch.call.active():
                batch.call.cancel()
            self._flush(key)
        return d

    def _flush(self, key: str) -> None:
        batch = self._open.pop(key)
        waiting = [d for _, _, d in batch.items]
        try:
            sent = batch.send([e for e, _, _ in batch.items], [b for _, b, _ in batch.items])
        except Exception:
            sent = fail()

        def settle(result: Any) -> None:
            for d in waiting:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        sent.addBoth(settle)
