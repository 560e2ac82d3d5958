from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest

from gehirn_ts.bus.local import LocalBus
from tests.contract.bus_contract import BusContract


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
