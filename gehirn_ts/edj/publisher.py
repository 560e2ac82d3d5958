"""Publishing: store the event, then put it on the bus; durable when the Deferred fires."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from gehirn_ts.events import Event
from gehirn_ts.interfaces import IEventBus
from gehirn_ts.metrics import Metrics
from gehirn_ts.store.db import Store


class Publisher:
    def __init__(self, store: Store, bus: IEventBus, metrics: Metrics | None = None) -> None:
        self._store = store
        self._bus = bus
        self._metrics = metrics or Metrics()

    def publish(self, event: Event) -> Deferred[None]:
        return Deferred.fromCoroutine(self._publish(event))

    async def _publish(self, event: Event) -> None:
        # The store and the bus write at once, and both are durable before this fires
        # (so GET /v1/events/{id} works as soon as the publisher has its 202). If only
        # one of them happened (a crash, a bus outage), routing stores a missing event
        # with its deliveries, and a repeated publish puts the event on the bus again:
        # routing is idempotent. An id already taken by another event (Conflict) is not
        # routed: routing compares the stored event with the message.
        stored = self._store.insert_event(event)
        queued = self._bus.publish(event)
        try:
            await stored
        except BaseException:
            queued.addErrback(lambda _: None)
            raise
        await queued
        self._metrics.events_published.inc()
