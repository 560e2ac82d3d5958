"""Publishing: store the event, then put it on the bus; durable when the Deferred fires."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from sqlite3 import Cursor

from twisted.internet.defer import Deferred

from gehirn_ts.events import Event
from gehirn_ts.interfaces import IEventBus
from gehirn_ts.metrics import Metrics
from gehirn_ts.store.db import Conflict, Store


class Publisher:
    def __init__(self, store: Store, bus: IEventBus, metrics: Metrics | None = None) -> None:
        self._store = store
        self._bus = bus
        self._metrics = metrics or Metrics()

    def publish(
        self, event: Event, with_store: Callable[[Cursor], object] | None = None
    ) -> Deferred[None]:
        """Publish one event; Conflict when its id is taken by another event.
        ``with_store`` writes what the event tells of in the transaction that stores
        it; the event goes on the bus after that commit, so no node can route it before
        those rows are there to read."""
        return Deferred.fromCoroutine(self._publish(event, with_store))

    async def _publish(self, event: Event, with_store: Callable[[Cursor], object] | None) -> None:
        (conflict,) = await self._publish_many([event], with_store)
        if conflict is not None:
            raise conflict

    def publish_many(
        self, events: Sequence[Event], with_store: Callable[[Cursor], object] | None = None
    ) -> Deferred[list[Conflict | None]]:
        """Publish events together (one store and one bus interaction for all). For each
        event in order: None when it is published, or the Conflict of an id taken by
        another event. Fires when all are durable. ``with_store`` as in ``publish``."""
        return Deferred.fromCoroutine(self._publish_many(events, with_store))

    async def _publish_many(
        self, events: Sequence[Event], with_store: Callable[[Cursor], object] | None = None
    ) -> list[Conflict | None]:
        # The store and the bus write at once, and both are durable before this fires
        # (so GET /v1/events/{id} works as soon as the publisher has its 202). If only
        # one of them happened (a crash, a bus outage), routing stores a missing event
        # with its deliveries, and a repeated publish puts the event on the bus again:
        # routing is idempotent. An id already taken by another event (Conflict) is not
        # routed: routing compares the stored event with the message. With rows of
        # their own (``with_store``), the events go on the bus after that commit, those
        # of a taken id not at all.
        stored = self._store.insert_events(events, before=with_store)
        queued = self._bus.publish_many(events) if with_store is None else None
        try:
            outcomes = await stored
        except BaseException:
            if queued is not None:
                queued.addErrback(lambda _: None)
            raise
        conflicts = [o if isinstance(o, Conflict) else None for o in outcomes]
        if queued is None:
            fresh = [e for e, c in zip(events, conflicts, strict=True) if c is None]
            if fresh:
                await self._bus.publish_many(fresh)
        else:
            await queued
        self._metrics.events_published.inc(conflicts.count(None))
        return conflicts
