"""The EDJ worker on an injected clock: the retry schedule is followed to the second."""

from __future__ import annotations

import json
import random
from pathlib import Path

from treq.client import HTTPClient
from twisted.internet import reactor, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from gehirn_ts.bus.local import LocalBus
from gehirn_ts.edj import registry
from gehirn_ts.edj.netguard import AddressPolicy, guarded_agent
from gehirn_ts.edj.publisher import Publisher
from gehirn_ts.edj.registry import MAX_BATCH
from gehirn_ts.edj.worker import DELIVER_QUEUE, EdjService, RetryPolicy
from gehirn_ts.events import Event
from gehirn_ts.interfaces import BusMessage, Delivered, Result
from gehirn_ts.store.db import Delivery, Store
from gehirn_ts.store.schema import migrate
from tests.harness import Receiver
from tests.support import inline, sleep, until


class WorkerClockTests(unittest.TestCase):
    def _worker(
        self, clock: IReactorTime, attempts_at_once: int | None = None
    ) -> tuple[Store, LocalBus, Publisher]:
        state = Path(self.mktemp())
        state.mkdir()
        migrate(state / "db.sqlite")
        store = Store(state / "db.sqlite", clock)
        self.addCleanup(store.close)
        bus = LocalBus(state / "bus.sqlite", clock)
        bus.startService()
        self.addCleanup(bus.stopService)
        policy = AddressPolicy(["127.0.0.0/8"])
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(guarded_agent(reactor, policy, pool))
        publisher = Publisher(store, bus)
        edj = EdjService(
            store=store,
            bus=bus,
            publisher=publisher,
            context=registry.Context(http, clock, policy, 5.0),
            retry=RetryPolicy((10.0, 100.0), jitter=0.0),
            clock=clock,
            **({} if attempts_at_once is None else {"attempts_at_once": attempts_at_once}),
        )
        edj.startService()
        self._edj = edj
        return store, bus, publisher

    def _held_attempts(self) -> list[Deferred[Result]]:
        """Every destination's attempts, each held until its Deferred is fired."""
        held: list[Deferred[Result]] = []

        class Held:
            kind = "webhook"

            def deliver(self, event: Event, body: bytes, delivery_id: str) -> Deferred[Result]:
                held.append(Deferred())
                return held[-1]

        self.patch(registry, "build", lambda url, secret, ctx: Held())
        # Let go of anything still held when an assertion failed, so the bus stops.
        self.addCleanup(lambda: [d.callback(Delivered(200)) for d in held if not d.called])
        return held

    @inline
    async def test_a_retry_is_queued_before_the_attempt_is_recorded(self) -> None:
        # Routing makes the first attempt itself; if recording it fails (a crash), the
        # retry must already be on the deliver queue and the event must be routed again.
        clock = task.Clock()
        store, bus, publisher = self._worker(clock)
        record = store.record_attempt
        calls = []

        def failing_once(*args: object, **kwargs: object) -> object:
            calls.append(args)
            if len(calls) == 1:
                raise OSError("disk gone")
            return record(*args, **kwargs)  # type: ignore[arg-type]

        store.record_attempt = failing_once  # type: ignore[method-assign]
        receiver = Receiver(plan=[503])
        account, _, _ = await store.create_account("acme")
        await store.create_subscription(account.id, "#", receiver.listen(self), None)
        await publisher.publish(Event(type="notice.fault", source="/t", account="acme", id="e"))
        await until(lambda: len(receiver.hits) == 1 and calls)
        await until(lambda: not bus._queues["edj.route"].inflight)
        assert bus.depth("edj.deliver") == 1, "the retry was not queued before the record"
        assert bus.depth("edj.route") == 1, "the event's message was acked without the record"
        clock.advance(5)  # the bus redelivers a message whose handler failed after 5 s
        await until(lambda: len(receiver.hits) == 2)
        history = await until(lambda: self._done(store))
        assert [a.status_code for a in history[0][1]] == [200]
        assert len(self.flushLoggedErrors(OSError)) == 1

    @inline
    async def test_routing_takes_the_published_event_without_parsing_it(self) -> None:
        from gehirn_ts.edj import worker

        def parse_again(body: bytes) -> Event:
            raise AssertionError("the event was parsed again")

        self.patch(worker, "event_from_own_json", parse_again)
        store, _, publisher = self._worker(task.Clock())
        receiver = Receiver(plan=[200])
        account, _, _ = await store.create_account("acme")
        await store.create_subscription(account.id, "#", receiver.listen(self), None)
        event = Event(type="notice.fault", source="/t", account="acme", id="e", data={"a": 1})
        await publisher.publish(event)
        await until(lambda: len(receiver.hits) == 1)
        assert receiver.hits[0].body == event.to_json()

    @inline
    async def test_a_subscription_s_destination_is_made_once(self) -> None:
        built: list[str] = []
        build = registry.build

        def counting(url: str, secret: str | None, ctx: registry.Context) -> object:
            if ctx.http is not None:  # not registry.redact's, for a log line
                built.append(url)
            return build(url, secret, ctx)

        self.patch(registry, "build", counting)
        store, _, publisher = self._worker(task.Clock())
        receiver = Receiver()
        account, _, _ = await store.create_account("acme")
        url = receiver.listen(self)
        await store.create_subscription(account.id, "a.#", url, None)
        await store.create_subscription(account.id, "b.#", url, "whsec_" + "QUJD" * 8)
        for n in range(3):
            await publisher.publish(Event(type="a.x", source="/t", account="acme", id=f"a{n}"))
            await publisher.publish(Event(type="b.x", source="/t", account="acme", id=f"b{n}"))
        await until(lambda: len(receiver.hits) == 6)
        # One for the plain subscription, one for the signed one (another secret).
        assert built == [url, url]
        assert sum("webhook-signature" in h.headers for h in receiver.hits) == 3

    @inline
    async def test_attempts_in_flight_are_capped(self) -> None:
        held = self._held_attempts()
        store, _, publisher = self._worker(task.Clock(), attempts_at_once=2)
        account, _, _ = await store.create_account("acme")
        for n in range(3):
            await store.create_subscription(account.id, "a.#", f"http://h{n}.test/", None)
        # An event to three subscriptions, and one to a single subscription (the path
        # that awaits its one attempt as it is): four attempts, never more than two on.
        await store.create_subscription(account.id, "solo.#", "http://solo.test/", None)
        await publisher.publish(Event(type="a.x", source="/t", account="acme", id="e1"))
        await publisher.publish(Event(type="solo.x", source="/t", account="acme", id="e2"))
        done = 0
        while done < 4:
            await until(lambda: len(held) > done)
            await sleep(0.05)  # time for an attempt past the cap to show
            assert len(held) - done <= 2, f"{len(held) - done} attempts at once"
            held[done].callback(Delivered(200))
            done += 1
        assert len(held) == 4

        async def all_delivered() -> bool:
            states = [d.status for e in ("e1", "e2") for d, _ in await store.deliveries_of_event(e)]
            return states == ["delivered"] * 4

        await until(all_delivered)  # the last attempt's record is written after its answer

    @inline
    async def test_a_retry_waits_for_a_slot_as_a_first_attempt_does(self) -> None:
        held = self._held_attempts()
        store, _, publisher = self._worker(task.Clock(), attempts_at_once=1)
        account, _, _ = await store.create_account("acme")
        await store.create_subscription(account.id, "a.#", "http://a.test/", None)
        other = await store.create_subscription(account.id, "b.#", "http://b.test/", None)
        await publisher.publish(Event(type="a.x", source="/t", account="acme", id="e1"))
        await until(lambda: len(held) == 1)  # the one slot is taken
        # A delivery due again, as the deliver queue hands it over (not routed here).
        await store.insert_event(Event(type="b.x", source="/t", account="acme", id="e2"))
        (retry,) = await store.create_deliveries("e2", [other.id])
        message = BusMessage(DELIVER_QUEUE, retry.id.encode(), DELIVER_QUEUE, "m1", 2)
        delivering = Deferred.fromCoroutine(self._edj.deliver(message))
        await sleep(0.05)
        assert len(held) == 1, "the retry did not wait for the slot"
        held[0].callback(Delivered(200))
        await until(lambda: len(held) == 2)
        held[1].callback(Delivered(200))
        await delivering

    @inline
    async def test_a_batch_subscription_s_attempts_take_no_slot(self) -> None:
        # One slot in all: were a batch's attempts to take one each, every request
        # would carry one event.
        store, _, publisher = self._worker(reactor, attempts_at_once=1)
        receiver = Receiver()
        account, _, _ = await store.create_account("acme")
        url = receiver.listen(self)
        await store.create_subscription(account.id, "#", url, None, batch=50)
        events = [Event(type="a.x", source="/t", account="acme", id=f"e{n}") for n in range(40)]
        await publisher.publish_many(events)
        await until(lambda: sum(len(json.loads(h.body)) for h in receiver.hits) == 40)
        assert max(len(json.loads(h.body)) for h in receiver.hits) > 1

    @inline
    async def test_a_first_attempt_cancelled_while_it_waits_leaves_no_slot_taken(self) -> None:
        store, _, _ = self._worker(task.Clock(), attempts_at_once=1)
        edj = self._edj
        held: list[Deferred[None]] = []

        async def attempt(*args: object, **kwargs: object) -> None:
            held.append(Deferred())
            await held[-1]

        edj._attempt_and_settle = attempt  # type: ignore[method-assign]
        account, _, _ = await store.create_account("acme")
        sub = await store.create_subscription(account.id, "#", "http://h.test/", None)
        event = Event(type="a.x", source="/t", account="acme", id="e1")
        one = Deferred.fromCoroutine(edj._first(_delivery("d1"), event, sub))
        waiting = Deferred.fromCoroutine(edj._first(_delivery("d2"), event, sub))
        waiting.addErrback(lambda f: f.trap(CancelledError))
        assert len(held) == 1
        waiting.cancel()  # as a stopping bus cancels the handlers it waits for
        held[0].callback(None)
        await one
        # The slot went back: the next first attempt starts at once.
        later = Deferred.fromCoroutine(edj._first(_delivery("d3"), event, sub))
        assert len(held) == 2
        held[1].callback(None)
        await later

    @inline
    async def test_a_batch_can_hold_more_than_the_old_prefetch_by_default(self) -> None:
        # A batch holds at most the messages one consumer works on at once, and the
        # first attempts allowed at once: with the defaults, a subscription's batch of
        # 100 is cut neither to 32 (the old prefetch) nor to 64 (the old cap on first
        # attempts). The reactor's clock: a batch is made of a turn's attempts
        # (callLater(0)).
        store, _, publisher = self._worker(reactor)
        receiver = Receiver()
        account, _, _ = await store.create_account("acme")
        url = receiver.listen(self)
        await store.create_subscription(account.id, "#", url, None, batch=MAX_BATCH)
        events = [Event(type="a.x", source="/t", account="acme", id=f"e{n}") for n in range(100)]
        await publisher.publish_many(events)
        await until(lambda: sum(len(json.loads(h.body)) for h in receiver.hits) == 100)
        assert max(len(json.loads(h.body)) for h in receiver.hits) > 64

    @inline
    async def test_retries_wait_for_the_injected_clock(self) -> None:
        random.seed(0)
        clock = task.Clock()
        clock.advance(1_000_000)
        store, bus, publisher = self._worker(clock)
        receiver = Receiver(plan=[503, 503])
        account, _, _ = await store.create_account("acme")
        await store.create_subscription(account.id, "#", receiver.listen(self), None)
        await publisher.publish(Event(type="notice.fault", source="/t", account="acme", id="e"))

        await until(lambda: len(receiver.hits) == 1)
        await until(
            lambda: bus.depth("edj.deliver") == 1 and not bus._queues["edj.deliver"].inflight
        )
        clock.advance(9.9)
        await sleep(0.3)
        assert len(receiver.hits) == 1, "retried before the schedule's 10 s"
        clock.advance(0.1)
        await until(lambda: len(receiver.hits) == 2)
        await until(lambda: not bus._queues["edj.deliver"].inflight)
        clock.advance(99)
        await sleep(0.3)
        assert len(receiver.hits) == 2, "retried before the schedule's 100 s"
        clock.advance(1)
        await until(lambda: len(receiver.hits) == 3)
        history = await until(lambda: self._done(store))
        attempts = history[0][1]
        assert [a.status_code for a in attempts] == [503, 503, 200]
        # Times come from the injected clock, not the wall clock.
        assert [round(a.started_at - 1_000_000) for a in attempts] == [0, 10, 110]

    async def _done(self, store: Store):
        history = await store.deliveries_of_event("e")
        return history if history and history[0][0].status == "delivered" else None


def _delivery(delivery_id: str) -> Delivery:
    return Delivery(delivery_id, "e1", "sub", "pending", 0, 0, None, None, 0.0, 0.0)
