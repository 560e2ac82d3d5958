from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from gehirn_ts.bus.local import LocalBus, _delete
from gehirn_ts.events import Event
from gehirn_ts.interfaces import BusMessage
from tests.contract.bus_contract import BusContract
from tests.support import inline, sleep, until


class LocalBusContract(BusContract, unittest.TestCase):
    prefetch = 4

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.buses: list[LocalBus] = []

    async def new_bus(self) -> Any:
        from pathlib import Path

        self.path = str(Path(self.mktemp()) / "bus.sqlite")
        return await self.reopen()

    async def reopen(self) -> Any:
        from pathlib import Path

        bus = LocalBus(
            Path(self.path), reactor, prefetch=self.prefetch, default_delay=0.2, stop_grace=0.5
        )
        bus.startService()
        self.buses.append(bus)
        self.addCleanup(self._stop, bus)
        return bus

    async def crash(self, bus: Any) -> None:
        # As after kill -9: the instance stops doing anything and acks nothing more;
        # only what was committed to its file remains.
        bus.running = False
        for q in bus._queues.values():
            q.handler = None
            if q.timer is not None and q.timer.active():
                q.timer.cancel()
        db, bus._db = bus._db, None
        db._closed = True  # refuses every later write, as a dead process would
        self.addCleanup(db.close)

    def _stop(self, bus: LocalBus) -> Any:
        if bus._db is None:
            return None
        bus.running = True
        return bus.stopService()


class LocalBusAckTests(unittest.TestCase):
    @inline
    async def test_acks_that_come_in_together_are_deleted_in_one_statement(self) -> None:
        from pathlib import Path

        path = Path(self.mktemp()) / "bus.sqlite"
        bus = LocalBus(path, reactor, prefetch=16)
        bus.startService()
        self.addCleanup(lambda: bus.stopService() if bus.running else None)
        await bus.bind("q", ["t.#"])
        db = await bus._ready()
        deletes: list[list[int]] = []
        run = db.run

        def counting(fn: Any, *args: Any) -> Any:
            if fn is _delete:
                deletes.append(list(args[0]))
            return run(fn, *args)

        db.run = counting  # type: ignore[method-assign]
        gate: Deferred[None] = Deferred()
        handled: list[str] = []

        async def handler(message: BusMessage) -> None:
            await gate
            handled.append(message.message_id)

        for n in range(10):
            await bus.publish(Event(type="t.x", source="/t", data={"n": n}))
        bus.consume("q", handler)
        gate.callback(None)  # all ten handlers finish in this one turn
        await until(lambda: len(handled) == 10 and bus._deleting is None)
        # The first ack starts a delete; the nine that come while it is written share one.
        assert [len(ids) for ids in deletes] == [1, 9]
        assert sorted(str(i) for ids in deletes for i in ids) == sorted(handled)
        await bus.stopService()

        again = LocalBus(path, reactor, prefetch=16)
        again.startService()
        self.addCleanup(again.stopService)
        later: list[BusMessage] = []

        async def record(message: BusMessage) -> None:
            later.append(message)

        await again.bind("q", ["t.#"])
        again.consume("q", record)
        await sleep(0.2)
        assert later == [] and again.depth("q") == 0


class LocalBusEventTests(unittest.TestCase):
    async def _bus(self, path: Any) -> tuple[LocalBus, list[BusMessage]]:
        """A bus with queue q bound to t.#, consumed into the list returned."""
        bus = LocalBus(path, reactor)
        bus.startService()
        self.addCleanup(lambda: bus.stopService() if bus.running else None)
        await bus.bind("q", ["t.#"])
        got: list[BusMessage] = []

        async def record(message: BusMessage) -> None:
            got.append(message)

        bus.consume("q", record)
        return bus, got

    @inline
    async def test_a_published_event_is_handed_over_as_it_is_while_the_bus_holds_it(
        self,
    ) -> None:
        from pathlib import Path

        path = Path(self.mktemp()) / "bus.sqlite"
        bus, got = await self._bus(path)
        event = Event(type="t.x", source="/t", data={"n": 1})
        await bus.publish(event)
        await bus.send("q", b"plain")
        await until(lambda: len(got) == 2)
        assert got[0].event is event and got[0].body == event.to_json()
        assert got[1].event is None and got[1].body == b"plain"
        # Published with no consumer (unbound queue p), then the process stops: the next
        # one reads the message from the file, bytes only.
        await bus.bind("p", ["t.y"])
        await bus.publish(Event(type="t.y", source="/t", id="later"))
        await bus.stopService()
        again = LocalBus(path, reactor)
        again.startService()
        self.addCleanup(again.stopService)
        later: list[BusMessage] = []

        async def record(message: BusMessage) -> None:
            later.append(message)

        again.consume("p", record)
        await until(lambda: len(later) == 1)
        assert later[0].event is None and b'"id":"later"' in later[0].body

    @inline
    async def test_a_backlog_keeps_the_events_of_its_first_messages_only(self) -> None:
        from pathlib import Path

        from gehirn_ts.bus import local

        self.patch(local, "_EVENT_CACHE", 2)
        bus = LocalBus(Path(self.mktemp()) / "bus.sqlite", reactor)
        bus.startService()
        self.addCleanup(bus.stopService)
        await bus.bind("q", ["t.#"])
        events = [Event(type="t.x", source="/t", id=f"e{n}") for n in range(4)]
        for event in events:
            await bus.publish(event)
        got: list[BusMessage] = []

        async def record(message: BusMessage) -> None:
            got.append(message)

        bus.consume("q", record)
        await until(lambda: len(got) == 4)
        by_body = {m.body: m.event for m in got}
        assert [by_body[e.to_json()] for e in events] == [events[0], events[1], None, None]
