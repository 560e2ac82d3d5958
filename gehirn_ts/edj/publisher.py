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
        # Stored first so GET /v1/events/{id} works as soon as the publisher has its 202.
        # A repeated publish of the same event is put on the bus again: routing is
        # idempotent, and it mends a publish that crashed between the two steps.
        await self._store.insert_event(event)
        await self._bus.publish(event)
        self._metrics.events_published.inc()
