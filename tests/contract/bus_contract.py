"""The contract every IEventBus implementation passes (embedded and AMQP).

A subclass provides ``new_bus()`` (a started bus on fresh storage), ``reopen()``
(a new bus on the same storage, as after a crash or restart) and ``crash(bus)``
(drop a bus without a clean stop).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import Deferred

from gehirn_ts.events import Event
from gehirn_ts.interfaces import BusMessage, IEventBus, Requeue
from tests.support import inline, sleep, until


class Recorder:
    def __init__(self, fail_times: int = 0, requeue: float | None = None) -> None:
        self.messages: list[BusMessage] = []
        self.fail_times = fail_times
        self.requeue = requeue
        self.active = 0
        self.peak = 0
        self.hold: Deferred[None] | None = None

    async def __call__(self, message: BusMessage) -> None:
        self.messages.append(message)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.hold is not None:
                await self.hold
            if self.fail_times > 0:
                self.fail_times -= 1
                if self.requeue is not None:
                    raise Requeue(self.requeue)
                raise RuntimeError("handler failure (expected by the test)")
        finally:
            self.active -= 1

    @property
    def bodies(self) -> list[bytes]:
        return [m.body for m in self.messages]


class BusContract:
    bus: Any

    async def new_bus(self) -> Any:
        raise NotImplementedError

    async def reopen(self) -> Any:
        raise NotImplementedError

    async def crash(self, bus: Any) -> None:
        raise NotImplementedError

    @inline
    async def test_provides_the_interface(self) -> None:
        bus = await self.new_bus()
        assert IEventBus.providedBy(bus)

    @inline
    async def test_publish_reaches_matching_queues_only(self) -> None:
        bus = await self.new_bus()
        await bus.bind("q.mail", ["mail.*"])
        await bus.bind("q.all", ["#"])
        await bus.bind("q.notice", ["notice.#"])
        mail, every, notice = Recorder(), Recorder(), Recorder()
        bus.consume("q.mail", mail)
        bus.consume("q.all", every)
        bus.consume("q.notice", notice)
        for type_ in ("mail.received", "notice.fault", "payment.done"):
            await bus.publish(Event(type=type_, source="/t"))
        await until(lambda: len(every.messages) == 3)
        await until(lambda: len(mail.messages) == 1 and len(notice.messages) == 1)
        await sleep(0.2)
        assert [json.loads(b)["type"] for b in mail.bodies] == ["mail.received"]
        assert [json.loads(b)["type"] for b in notice.bodies] == ["notice.fault"]
        assert mail.messages[0].routing_key == "mail.received"
        assert len(every.messages) == 3

    @inline
    async def test_publish_many_puts_each_event_on_its_queues_durably(self) -> None:
        bus = await self.new_bus()
        await bus.bind("m.mail", ["mail.*"])
        await bus.bind("m.all", ["#"])
        types = ("mail.received", "notice.fault", "mail.sent")
        events = [Event(type=t, source="/t", id=f"m{n}") for n, t in enumerate(types)]
        await bus.publish_many(events)
        # Fired: every one of them is stored, and a crash loses none.
        await self.crash(bus)
        bus2 = await self.reopen()
        mail, every = Recorder(), Recorder()
        bus2.consume("m.mail", mail)
        bus2.consume("m.all", every)
        await until(lambda: len(every.messages) == 3 and len(mail.messages) == 2)
        assert sorted(json.loads(b)["id"] for b in mail.bodies) == ["m0", "m2"]
        assert sorted(every.bodies) == sorted(e.to_json() for e in events)
        assert sorted(m.routing_key for m in every.messages) == sorted(types)
        await bus2.publish_many([])  # nothing to publish is not an error

    @inline
    async def test_events_published_together_reach_the_handler_one_by_one(self) -> None:
        bus = await self.new_bus()
        await bus.bind("together", ["#"])
        events = [Event(type="notice.fault", source="/t", id=f"t{n}") for n in range(7)]
        events.insert(3, Event(type="mail.received", source="/t", id="t-mail"))
        rec = Recorder()
        bus.consume("together", rec)
        await bus.publish_many(events)
        await until(lambda: len(rec.messages) == len(events))
        await sleep(0.3)
        assert sorted(rec.bodies) == sorted(e.to_json() for e in events)
        keys = sorted(m.routing_key for m in rec.messages)
        assert keys == ["mail.received"] + ["notice.fault"] * 7
        assert len({m.message_id for m in rec.messages}) == len(events)

    @inline
    async def test_an_event_that_fails_comes_back_alone(self) -> None:
        bus = await self.new_bus()
        await bus.bind("alone", ["#"])
        seen: list[tuple[str, int]] = []

        async def handler(message: BusMessage) -> None:
            event_id = json.loads(message.body)["id"]
            seen.append((event_id, message.attempt))
            if event_id == "a3" and message.attempt == 1:
                raise Requeue(0.3)

        bus.consume("alone", handler)
        await bus.publish_many(
            [Event(type="notice.fault", source="/t", id=f"a{n}") for n in range(6)]
        )
        await until(lambda: ("a3", 2) in seen, timeout=10)
        await sleep(0.5)
        assert sorted(seen) == sorted([(f"a{n}", 1) for n in range(6)] + [("a3", 2)])

    @inline
    async def test_a_binding_applies_to_publishes_made_right_after_it(self) -> None:
        bus = await self.new_bus()
        bound = bus.bind("fresh", ["#"])  # not awaited: startup order is enough
        await bus.publish(Event(type="notice.fault", source="/t"))
        await bound
        rec = Recorder()
        bus.consume("fresh", rec)
        await until(lambda: len(rec.messages) == 1)

    @inline
    async def test_send_delivers_once_and_ack_is_final(self) -> None:
        bus = await self.new_bus()
        rec = Recorder()
        bus.consume("work", rec)
        await bus.send("work", b"one")
        await until(lambda: rec.bodies == [b"one"])
        await sleep(0.3)
        assert rec.bodies == [b"one"]
        assert rec.messages[0].attempt == 1
        # Acked: a restart does not bring it back.
        await until(lambda: self._settled(bus, "work"))
        await self.crash(bus)
        bus2 = await self.reopen()
        rec2 = Recorder()
        bus2.consume("work", rec2)
        await sleep(0.5)
        assert rec2.messages == []

    def _settled(self, bus: Any, queue: str) -> bool:
        depth = getattr(bus, "depth", None)
        return depth is None or depth(queue) == 0

    @inline
    async def test_unacked_message_survives_a_crash(self) -> None:
        bus = await self.new_bus()
        await bus.bind("durable", ["notice.#"])
        await bus.publish(Event(type="notice.fault", source="/t", id="e1"))
        await bus.send("durable", b"direct")
        # No consumer ever acked: drop the bus as a crash would.
        await self.crash(bus)
        bus2 = await self.reopen()
        rec = Recorder()
        bus2.consume("durable", rec)
        await until(lambda: len(rec.messages) == 2)
        assert sorted(rec.bodies)[0] == b"direct"
        assert json.loads(sorted(rec.bodies)[1])["id"] == "e1"

    @inline
    async def test_message_in_flight_at_a_crash_is_delivered_again(self) -> None:
        bus = await self.new_bus()
        rec = Recorder()
        rec.hold = Deferred()
        bus.consume("inflight", rec)
        await bus.send("inflight", b"x")
        await until(lambda: rec.messages)
        await self.crash(bus)
        bus2 = await self.reopen()
        rec2 = Recorder()
        bus2.consume("inflight", rec2)
        await until(lambda: rec2.bodies == [b"x"])

    @inline
    async def test_requeue_delays_redelivery(self) -> None:
        bus = await self.new_bus()
        rec = Recorder(fail_times=1, requeue=1.0)
        bus.consume("retry", rec)
        await bus.send("retry", b"r")
        await until(lambda: len(rec.messages) == 1)
        await sleep(0.5)
        assert len(rec.messages) == 1, "redelivered before the requested delay"
        await until(lambda: len(rec.messages) == 2, timeout=5)
        assert rec.messages[1].body == b"r"
        assert rec.messages[1].attempt == 2

    @inline
    async def test_handler_error_requeues(self) -> None:
        bus = await self.new_bus()
        rec = Recorder(fail_times=1)
        bus.consume("errors", rec)
        await bus.send("errors", b"e")
        await until(lambda: len(rec.messages) == 2, timeout=10)
        self.flushLoggedErrors(RuntimeError)  # type: ignore[attr-defined]

    @inline
    async def test_delayed_send(self) -> None:
        bus = await self.new_bus()
        rec = Recorder()
        bus.consume("later", rec)
        await bus.send("later", b"now")
        await bus.send("later", b"late", delay=1.0)
        await until(lambda: rec.bodies == [b"now"])
        await sleep(0.4)
        assert rec.bodies == [b"now"]
        await until(lambda: rec.bodies == [b"now", b"late"], timeout=5)

    @inline
    async def test_bodies_round_trip_byte_for_byte(self) -> None:
        bus = await self.new_bus()
        rec = Recorder()
        bus.consume("bytes", rec)
        text = json.dumps({"text": "grüße 🚀 日本語"}, ensure_ascii=False).encode()
        blob = os.urandom(1024 * 1024)
        await bus.send("bytes", text)
        await bus.send("bytes", blob)
        await until(lambda: len(rec.messages) == 2)
        assert sorted(rec.bodies, key=len) == [text, blob]

    @inline
    async def test_prefetch_bounds_work_in_flight(self) -> None:
        bus = await self.new_bus()
        rec = Recorder()
        rec.hold = Deferred()
        bus.consume("many", rec)
        for i in range(self.prefetch + 5):  # type: ignore[attr-defined]
            await bus.send("many", str(i).encode())
        await until(lambda: len(rec.messages) == self.prefetch)  # type: ignore[attr-defined]
        await sleep(0.3)
        assert rec.peak == self.prefetch  # type: ignore[attr-defined]
        rec.hold.callback(None)
        rec.hold = None
        await until(lambda: len(rec.messages) == self.prefetch + 5)  # type: ignore[attr-defined]
