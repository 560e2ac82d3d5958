from __future__ import annotations

import json
import secrets
import socket
import struct
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from gehirn_ts.bus import grouping
from gehirn_ts.bus import txamqp_compat as compat
from gehirn_ts.bus.amqp import AmqpBus
from gehirn_ts.events import Event, event_from_own_json
from gehirn_ts.interfaces import BusUnavailable, Requeue
from tests.contract.bus_contract import BusContract
from tests.rabbitmq import rabbitmq_url
from tests.support import inline, sleep, until


class AmqpBusContract(BusContract, unittest.TestCase):
    prefetch = 4
    timeout = 60

    def setUp(self) -> None:
        self.url = rabbitmq_url()
        self.namespace = ""

    async def new_bus(self) -> Any:
        # A fresh namespace is fresh storage: its own exchange and queues.
        self.namespace = "test-" + secrets.token_hex(4)
        return await self.reopen()

    async def reopen(self) -> Any:
        bus = AmqpBus(
            self.url,
            reactor,
            namespace=self.namespace,
            prefetch=self.prefetch,
            default_delay=0.2,
            stop_grace=0.5,
            heartbeat=0,
        )
        bus.startService()
        self.addCleanup(self._stop, bus)
        await until(bus.connected)
        return bus

    async def crash(self, bus: Any) -> None:
        # As after kill -9: the TCP connection drops with nothing acked or closed cleanly.
        bus.running = False
        conn = bus._conn
        bus._handlers = {}
        conn.client.transport.abortConnection()
        await until(lambda: not conn.alive)

    def _stop(self, bus: AmqpBus) -> Any:
        if not bus.running:
            return bus._loop
        return bus.stopService()

    @inline
    async def test_the_connection_sends_small_frames_at_once(self) -> None:
        # Nagle's algorithm held each publish's frames for the broker's delayed ACK:
        # p50 latency 59 ms instead of 18 ms at 200 events/s (bench/events.py).
        bus = await self.new_bus()
        sock = bus._conn.client.transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


class AmqpMethodsSent(unittest.TestCase):
    timeout = 60

    @inline
    async def test_every_method_the_bus_sends_is_the_specifications(self) -> None:
        from txamqp.protocol import AMQChannel

        from tests.unit.test_txamqp_compat import SENT_FIELDS, SPEC_IDS

        sent: list[tuple[str, str, int, int]] = []
        original = AMQChannel.invoke

        def recording(channel: Any, method: Any, args: Any, content: Any = None) -> Any:
            sent.append((method.klass.name, method.name, method.klass.id, method.id))
            return original(channel, method, args, content)

        AMQChannel.invoke = recording
        self.addCleanup(setattr, AMQChannel, "invoke", original)
        # What the client packs itself (publish, ack): the ids read back from its bytes.
        names = {(60, 40): ("basic", "publish"), (60, 80): ("basic", "ack")}
        for packer in ("publish_frames", "ack_frame"):
            packs = getattr(compat, packer)

            def packed(*args: Any, _packs: Any = packs) -> bytes:
                data: bytes = _packs(*args)
                ids = struct.unpack("!HH", data[7:11])
                sent.append((*names.get(ids, ("?", "?")), *ids))
                return data

            self.patch(compat, packer, packed)
        bus = AmqpBus(
            rabbitmq_url(),
            reactor,
            namespace="test-" + secrets.token_hex(4),
            heartbeat=0,
            default_delay=0.1,
        )
        bus.startService()
        await until(bus.connected)
        seen: list[bytes] = []

        async def handler(message: Any) -> None:
            seen.append(message.body)
            if len(seen) == 1:
                raise Requeue(0.1)

        await bus.bind("q", ["#"])
        bus.consume("q", handler)
        await bus.publish(Event(type="a.b", source="/t"))
        await bus.send("q", b"x", delay=0.1)
        await until(lambda: len(seen) == 3)
        await bus.stopService()
        kinds = {(k, m) for k, m, _, _ in sent}
        assert {
            ("confirm", "select"),
            ("basic", "publish"),
            ("basic", "ack"),
            ("basic", "consume"),
            ("queue", "bind"),
        } <= kinds
        for klass, method, class_id, method_id in sent:
            assert SPEC_IDS[klass][0] == class_id, (klass, method)
            assert SPEC_IDS[klass][1][method] == method_id, (klass, method)
            assert (klass, method) in SENT_FIELDS, (klass, method)


class _OwnBus(unittest.TestCase):
    timeout = 60

    async def bus(self, **kwargs: Any) -> AmqpBus:
        """A started bus in a namespace of its own, stopped after the test."""
        bus = AmqpBus(
            rabbitmq_url(), reactor, namespace="test-" + secrets.token_hex(4), heartbeat=0, **kwargs
        )
        bus.startService()
        self.addCleanup(bus.stopService)
        await until(bus.connected)
        return bus


class AmqpBrokerRefusals(_OwnBus):
    def refuse_beyond_one(self, bus: AmqpBus, queue: str) -> None:
        """A policy that makes the broker refuse (nack) publishes to ``queue`` beyond
        one queued message."""
        from tests.rabbitmq import ctl

        name = bus.queue_name(queue)
        ctl(
            "set_policy",
            f"full-{name}",
            f"^{name}$",
            '{"max-length": 1, "overflow": "reject-publish"}',
            "--apply-to",
            "queues",
        )
        self.addCleanup(ctl, "clear_policy", f"full-{name}")

    async def first_refusal(self, publish: Any) -> BusUnavailable | None:
        """The error of the first of up to 20 tries of ``publish(n)`` the broker refuses
        (a policy takes a moment to apply)."""
        for n in range(20):
            try:
                await publish(n)
            except BusUnavailable as e:
                return e
            await sleep(0.1)
        return None

    @inline
    async def test_a_nack_fails_the_publish(self) -> None:
        bus = await self.bus()
        self.refuse_beyond_one(bus, "full")
        await bus.send("full", b"first")
        failure = await self.first_refusal(lambda n: bus.send("full", b"more"))
        assert failure is not None and "nack" in str(failure)

    @inline
    async def test_a_nack_of_one_fails_a_publish_of_many(self) -> None:
        bus = await self.bus()
        await bus.bind("full-many", ["#"])
        self.refuse_beyond_one(bus, "full-many")
        failure = await self.first_refusal(
            lambda n: bus.publish_many(
                [Event(type="notice.fault", source="/t", id=f"e{n}.{k}") for k in range(3)]
            )
        )
        assert failure is not None and "nack" in str(failure)

    @inline
    async def test_a_message_that_keeps_failing_goes_to_the_dead_letter_queue(self) -> None:
        bus = await self.bus(default_delay=0.05, max_failures=3)
        calls: list[int] = []

        async def broken(message: Any) -> None:
            calls.append(message.attempt)
            raise RuntimeError("always fails (expected by the test)")

        bus.consume("poison", broken)
        await bus.send("poison", b"bad")
        await until(lambda: len(calls) == 3)
        conn = bus._conn
        dead = f"{bus._ns}.dead"

        async def in_dead_queue() -> bool:
            reply = await conn.publish_ch.queue_declare(queue=dead, durable=True)
            return bool(reply.message_count == 1)

        await until(in_dead_queue)
        await sleep(0.3)
        assert calls == [1, 2, 3]
        self.flushLoggedErrors(RuntimeError)


class AmqpBatches(_OwnBus):
    """Events published together travel as one message per type (bus/grouping.py)."""

    async def depth(self, bus: AmqpBus, queue: str) -> int:
        assert bus._conn is not None
        reply = await bus._conn.publish_ch.queue_declare(queue=bus.queue_name(queue), durable=True)
        return int(reply.message_count)

    @inline
    async def test_events_of_one_type_published_together_are_one_message(self) -> None:
        bus = await self.bus()
        await bus.bind("raw", ["#"])  # no consumer: the messages stay queued
        events = [Event(type="notice.fault", source="/t") for _ in range(5)]
        events += [Event(type="mail.received", source="/t") for _ in range(2)]
        await bus.publish_many(events)
        await until(lambda: self._depth_is(bus, "raw", 2))
        await bus.publish_many(events[:3])
        await until(lambda: self._depth_is(bus, "raw", 3))

    async def _depth_is(self, bus: AmqpBus, queue: str, n: int) -> bool:
        return await self.depth(bus, queue) == n

    async def publish_raw(self, bus: AmqpBus, body: bytes, headers: dict[str, Any]) -> None:
        assert bus._conn is not None
        await bus._publish_now(
            bus._conn,
            bus.exchange,
            "notice.fault",
            body,
            headers,
            grouping.BATCH_CONTENT_TYPE,
            None,
        )

    @inline
    async def test_another_publisher_s_batch_without_lengths_is_split(self) -> None:
        bus = await self.bus()
        await bus.bind("foreign", ["#"])
        seen: list[bytes] = []

        async def handler(message: Any) -> None:
            seen.append(message.body)

        bus.consume("foreign", handler)
        events = [
            Event(type="notice.fault", source="/t", id=f"f{n}", data={"n": n}) for n in range(3)
        ]
        body = json.dumps([e.to_dict() for e in events], indent=2).encode()
        await self.publish_raw(bus, body, {})
        await until(lambda: len(seen) == 3)
        assert sorted(event_from_own_json(b).id for b in seen) == ["f0", "f1", "f2"]
        # One that is no batch at all reaches the handler as it is.
        await self.publish_raw(bus, b"[not json", {grouping.LENGTHS_HEADER: [3]})
        await until(lambda: len(seen) == 4)
        assert seen[3] == b"[not json"

    @inline
    async def test_events_of_batches_in_hand_are_bounded_by_the_prefetch(self) -> None:
        bus = await self.bus(prefetch=4)
        await bus.bind("held", ["#"])
        hold: Deferred[None] = Deferred()
        active = [0, 0, 0]  # now, peak, seen

        async def handler(message: Any) -> None:
            active[0] += 1
            active[1] = max(active[1], active[0])
            active[2] += 1
            try:
                await hold
            finally:
                active[0] -= 1

        bus.consume("held", handler)
        for _ in range(3):
            await bus.publish_many([Event(type="notice.fault", source="/t") for _ in range(10)])
        await until(lambda: active[2] == 4)
        await sleep(0.3)
        assert active[1] == 4
        hold.callback(None)
        await until(lambda: active[2] == 30)
        assert active[1] == 4
