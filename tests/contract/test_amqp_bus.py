from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from gehirn_ts.bus.amqp import AmqpBus
from gehirn_ts.events import Event
from gehirn_ts.interfaces import Requeue
from tests.contract.bus_contract import BusContract
from tests.rabbitmq import rabbitmq_url
from tests.support import inline, until


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
