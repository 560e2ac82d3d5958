"""Runs the EDJ: routes events to deliveries, and attempts each delivery.

Two bus queues: ``edj.route`` (bound to every event type) and ``edj.deliver``
(one message per retry, body = the delivery id). Routing creates the deliveries and
makes their first attempt itself, before it acks the event's message: a crash
before the ack routes the event again, and every delivery not yet attempted is
attempted then (at least once). A delivery to retry goes to ``edj.deliver`` with its
delay, before its attempt is recorded. The store holds each delivery's state and
attempt log; the bus holds when it is next due.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime

from gehirn_ts.edj import registry
from gehirn_ts.edj.batching import Batches
from gehirn_ts.edj.publisher import Publisher
from gehirn_ts.edj.render import render
from gehirn_ts.edj.retry import next_delay
from gehirn_ts.edj.router import route
from gehirn_ts.events import EDJ_DELIVERY_FAILED, Event, event_from_own_json
from gehirn_ts.interfaces import (
    BusMessage,
    BusUnavailable,
    Delivered,
    IDestination,
    IEventBus,
    PermFail,
    Requeue,
    Result,
)
from gehirn_ts.logs import Logger
from gehirn_ts.metrics import Metrics
from gehirn_ts.slots import Slots
from gehirn_ts.store.db import Delivery, NotFound, Store, Subscription

log = Logger()

ROUTE_QUEUE = "edj.route"
DELIVER_QUEUE = "edj.deliver"
MAX_DESTINATIONS = 4096  # kept destinations; past this many all are dropped


@dataclass(frozen=True)
class RetryPolicy:
    schedule: Sequence[float]
    jitter: float = 0.2
    max_retry_after: float = 86400.0


# Delivery requests at once, in all (EdjService).
ATTEMPTS_AT_ONCE = 128


class EdjService(Service):
    name = "edj"

    def __init__(
        self,
        *,
        store: Store,
        bus: IEventBus,
        publisher: Publisher,
        context: registry.Context,
        retry: RetryPolicy,
        clock: IReactorTime,
        source: str = "/gehirn-ts/edj",
        metrics: Metrics | None = None,
        attempts_at_once: int = ATTEMPTS_AT_ONCE,
    ) -> None:
        self._metrics = metrics or Metrics()
        self._store = store
        self._bus = bus
        self._publisher = publisher
        self._ctx = context
        # Destinations by (url, secret): each is made from its URL alone and keeps no
        # state of a delivery (an IRC bot lives in the network), so one serves every
        # delivery of its subscriptions; making one per attempt (URL parsing and all)
        # was 2-3% of an event's CPU.
        self._destinations: dict[tuple[str, str | None], IDestination] = {}
        self._retry = retry
        self._clock = clock
        self._source = source
        self._active: set[str] = set()
        # Requests at once, in all (first attempts and retries): an event with many
        # subscriptions, or a burst of retries, waits here rather than opening a
        # connection for each. Attempts to a batch subscription take no slot: they go
        # out together, up to the batch a request, so a slot each cut every batch to
        # the slots free in its turn (docs/performance.md, session 15); the messages
        # the bus hands out at once (its prefetch) bound them.
        self._slots = Slots(attempts_at_once)
        self._batches = Batches(clock)
        self._children: dict[tuple[Any, ...], Any] = {}

    def startService(self) -> None:
        super().startService()
        # Bound before the HTTP listener starts (services start in order), so no event
        # published through the API can miss the routing queue.
        d = self._bus.bind(ROUTE_QUEUE, ["#"])
        d.addErrback(lambda f: log.failure("EDJ could not bind its queue", f))
        self._bus.consume(ROUTE_QUEUE, self.route)
        self._bus.consume(DELIVER_QUEUE, self.deliver)

    # --- routing ---

    async def route(self, message: BusMessage) -> None:
        # The embedded bus hands over the published Event (frozen; its JSON is these
        # bytes): parsing them again was about 3% of an event's CPU.
        event = message.event if message.event is not None else event_from_own_json(message.body)
        # One transaction picks the subscriptions, stores the event when missing (an
        # internal publisher may have crashed between the store and the bus) and
        # creates the deliveries; all of it idempotent.
        new, subscriptions = await self._store.route_event(event, lambda s: route(event, s))
        if not subscriptions:
            return
        log.debug("event {event_id} routed to {n} deliveries", event_id=event.id, n=len(new))
        by_id = {s.id: s for s in subscriptions}
        try:
            if len(new) == 1:
                # The usual case, awaited as it is: a Deferred and a list of one were
                # a twentieth of an event's CPU.
                await self._first(new[0], event, by_id[new[0].subscription_id])
                return
            attempts = [
                Deferred.fromCoroutine(self._first(d, event, by_id[d.subscription_id])) for d in new
            ]
            for ok, failure in await DeferredList(attempts, consumeErrors=True):
                if not ok and failure is not None:
                    failure.raiseException()  # the route message is redelivered
        except BusUnavailable:
            # A retry could not be queued (the bus is stopping or away): the event is
            # routed again later, and its attempt repeated then.
            raise Requeue(1.0)

    async def _first(self, delivery: Delivery, event: Event, sub: Subscription) -> None:
        slot = await self._take_slot(sub)
        try:
            if delivery.id in self._active:
                return
            self._active.add(delivery.id)
            try:
                await self._attempt_and_settle(delivery, event, sub, by_send=True)
            finally:
                self._active.discard(delivery.id)
        finally:
            if slot:
                self._slots.release()

    def _batch_send(self, sub: Subscription) -> Any | None:
        """The destination's batch request when ``sub`` takes its events in batches.
        Raises ValueError for a destination that cannot be made."""
        if sub.batch <= 1:
            return None
        return getattr(self._destination(sub), "deliver_batch", None)

    async def _take_slot(self, sub: Subscription) -> bool:
        """Wait for a request slot unless ``sub`` takes its events in batches; whether
        one was taken (and must be released)."""
        try:
            if self._batch_send(sub) is not None:
                return False
        except ValueError:
            pass  # unusable: its attempt fails at once
        await self._slots.take()
        return True

    # --- delivering ---

    async def deliver(self, message: BusMessage) -> None:
        delivery_id = message.body.decode()
        if delivery_id in self._active:
            return  # a duplicate message while the same delivery is being attempted
        self._active.add(delivery_id)
        try:
            await self._deliver(delivery_id)
        finally:
            self._active.discard(delivery_id)

    async def _deliver(self, delivery_id: str) -> None:
        try:
            delivery, event, sub = await self._store.delivery_context(delivery_id)
        except NotFound:
            log.warn("delivery {delivery_id} not found; message dropped", delivery_id=delivery_id)
            return
        if delivery.status != "pending":
            return
        now = self._clock.seconds()
        if delivery.next_attempt_at is not None and delivery.next_attempt_at > now + 1.0:
            raise Requeue(delivery.next_attempt_at - now)
        if sub.deleted_at is not None:
            await self._store.set_delivery_status(delivery_id, "cancelled")
            return
        slot = await self._take_slot(sub)
        try:
            await self._attempt_and_settle(delivery, event, sub, by_send=False)
        finally:
            if slot:
                self._slots.release()

    async def _attempt_and_settle(
        self, delivery: Delivery, event: Event, sub: Subscription, *, by_send: bool
    ) -> None:
        started = self._clock.seconds()
        kind, result = await self._attempt(event, sub, delivery.id)
        duration = self._clock.seconds() - started
        await self._settle(delivery, event, sub, result, started, duration, by_send)
        self._measure(kind, event, result, delivery)

    async def _attempt(
        self, event: Event, sub: Subscription, delivery_id: str
    ) -> tuple[str, Result]:
        try:
            destination = self._destination(sub)
            body = render(event, destination.kind, sub.template)
        except ValueError as e:
            return "unusable", PermFail(f"destination unusable: {e}")
        send = self._batch_send(sub)
        if send is not None:
            # Retries too: a receiver that asked for batches always gets an array.
            result: Result = await self._batches.attempt(sub.id, sub.batch, send, event, body)
        else:
            result = await destination.deliver(event, body, delivery_id)
        return str(destination.kind), result

    def _destination(self, sub: Subscription) -> IDestination:
        key = (sub.url, sub.secret)
        destination = self._destinations.get(key)
        if destination is None:
            destination = registry.build(sub.url, sub.secret, self._ctx)
            if len(self._destinations) >= MAX_DESTINATIONS:
                self._destinations.clear()
            self._destinations[key] = destination
        return destination

    def _measure(self, kind: str, event: Event, result: Result, delivery: Delivery) -> None:
        if isinstance(result, Delivered):
            outcome = "delivered"
            try:
                sent = datetime.fromisoformat(event.time.replace("Z", "+00:00")).timestamp()
                self._metric(self._metrics.delivery_latency, kind).observe(
                    max(0.0, self._clock.seconds() - sent)
                )
            except ValueError:
                pass
        elif isinstance(result, PermFail):
            outcome = "dead"
        else:
            outcome = "retry"
        self._metric(self._metrics.deliveries, kind, outcome).inc()

    def _metric(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once (prometheus_client checks and locks
        on every ``labels`` call; the kinds and outcomes are few)."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    async def _settle(
        self,
        delivery: Delivery,
        event: Event,
        sub: Subscription,
        result: Result,
        started: float,
        duration: float,
        by_send: bool,
    ) -> None:
        """Record the attempt; a retry is put on the deliver queue (``by_send``: the
        message in hand is not a delivery message) or the message requeued."""
        delay: float | None = None
        if isinstance(result, Delivered):
            status, outcome = "delivered", "delivered"
        elif isinstance(result, PermFail):
            status, outcome = "dead", "failed"
        else:
            delay = next_delay(
                delivery.failures + 1,
                self._retry.schedule,
                jitter=self._retry.jitter,
                retry_after=result.retry_after,
                max_retry_after=self._retry.max_retry_after,
            )
            status, outcome = ("pending", "retry") if delay is not None else ("dead", "failed")
        fields = dict(
            delivery_id=delivery.id,
            event_id=event.id,
            destination=registry.redact(sub.url),
            outcome=outcome,
            reason=result.reason,
        )
        if status == "dead":
            # Published before the status is written: if the process dies in between, the
            # attempt is repeated and the same failure event (same id) is stored once.
            await self._dead_letter(delivery, event, sub, result, delivery.attempts + 1)
            log.warn(
                "delivery {delivery_id} of event {event_id} to {destination} dead: {reason}",
                **fields,
            )
        else:
            log.info(
                "delivery {delivery_id} of event {event_id} to {destination}: {outcome} {reason}",
                **fields,
            )
        if delay is not None and by_send:
            # Sent before the attempt is recorded: a crash in between leaves a retry
            # message and a delivery that routing still counts as not attempted, so
            # it is attempted again rather than forgotten.
            await self._bus.send(DELIVER_QUEUE, delivery.id.encode(), delay)
        await self._store.record_attempt(
            delivery.id,
            started_at=started,
            duration=duration,
            outcome=outcome,
            status_code=result.status_code,
            detail=result.reason or None,
            new_status=status,
            next_attempt_at=None if delay is None else self._clock.seconds() + delay,
            failed=not isinstance(result, Delivered),
        )
        if delay is not None and not by_send:
            raise Requeue(delay)

    async def _dead_letter(
        self, delivery: Delivery, event: Event, sub: Subscription, result: Result, n: int
    ) -> None:
        if event.type == EDJ_DELIVERY_FAILED:
            return  # never report the failure of a failure report: that could loop
        failed = Event(
            type=EDJ_DELIVERY_FAILED,
            source=self._source,
            id=f"{delivery.id}.dead.{n}",
            account=sub.account,
            severity="warning",
            subject=delivery.id,
            data={
                "delivery_id": delivery.id,
                "event_id": event.id,
                "event_type": event.type,
                "subscription_id": sub.id,
                "destination": registry.redact(sub.url),
                "attempts": n,
                "reason": result.reason,
                "status_code": result.status_code,
                # Carried on so that an e-mail about this failure still counts the hops
                # of the mail loop it may belong to (edj/destinations/email.py).
                "loop_hops": event.data.get("loop_hops") if isinstance(event.data, dict) else None,
            },
        )
        await self._publisher.publish(failed)

    async def replay(self, delivery_id: str, account_id: int | None) -> Delivery:
        delivery = await self._store.replay_delivery(delivery_id, account_id)
        await self._bus.send(DELIVER_QUEUE, delivery_id.encode())
        return delivery
