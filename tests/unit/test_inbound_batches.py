"""Received messages are stored in batches: the rows and events of those that come while
one store call is under way go together in the next (``Inbound._store_many``)."""

from __future__ import annotations

import time
from pathlib import Path

from twisted.internet.defer import Deferred

from gehirn_ts.mta import inbound as inbound_module
from tests.support import inline, until
from tests.unit.test_spool_retry import SpoolCase


class BatchTests(SpoolCase):
    def _spooled_now(self) -> list[str]:
        return sorted(p.name for p in self.spool.incoming.iterdir() if p.suffix == ".eml")

    @inline
    async def test_what_comes_in_while_a_batch_is_stored_goes_in_the_next(self) -> None:
        self.publisher.hold = True
        first = await self._spooled("m0")
        self.inbound.accepted(first)
        await until(lambda: self.publisher.held)
        later = [await self._spooled(f"m{n}") for n in range(1, 4)]
        for envelope in later:
            self.inbound.accepted(envelope)
        await until(lambda: self.inbound._stores.waiting == 3)  # they wait for the first
        assert self.publisher.calls == [1]
        self.publisher.hold = False
        self.publisher.held[0].callback([None])
        await until(lambda: len(self.publisher.calls) == 2)
        assert self.publisher.calls == [1, 3]  # one store interaction for the three
        assert self._subjects() == ["m0", "m1", "m2", "m3"]
        await until(lambda: self._spooled_now() == [])
        for envelope in [first, *later]:
            assert (self.kvs / f"{envelope.queue_id}.eml").exists()
        assert [r.id for r in self.mail.received] == [e.queue_id for e in [first, *later]]

    @inline
    async def test_a_message_whose_event_fails_alone_stays_spooled_alone(self) -> None:
        self.publisher.hold = True
        self.inbound.accepted(await self._spooled("m0"))
        await until(lambda: self.publisher.held)
        self.publisher.conflicting = {"bad"}
        bad = await self._spooled("bad")
        for envelope in (await self._spooled("m1"), bad, await self._spooled("m2")):
            self.inbound.accepted(envelope)
        await until(lambda: self.inbound._stores.waiting == 3)
        self.publisher.hold = False
        self.publisher.held[0].callback([None])
        await until(lambda: self._spooled_now() == [f"{bad.queue_id}.eml"])
        assert self.publisher.calls == [1, 3]
        assert self._subjects() == ["m0", "m1", "m2"]
        assert len(self.flushLoggedErrors()) == 1  # that message's failure, logged

    @inline
    async def test_a_store_that_fails_leaves_the_batch_spooled_for_the_retry(self) -> None:
        self.publisher.hold = True
        self.inbound.accepted(await self._spooled("m0"))
        await until(lambda: self.publisher.held)
        for n in (1, 2, 3):
            self.inbound.accepted(await self._spooled(f"m{n}"))
        await until(lambda: self.inbound._stores.waiting == 3)
        self.publisher.hold = False
        self.publisher.failures = 1  # the second batch's store fails
        self.publisher.held[0].callback([None])
        await until(lambda: len(self.publisher.calls) == 2)
        await until(lambda: len(self.flushLoggedErrors(OSError)) == 3)  # each message's
        assert self.publisher.calls == [1, 3]
        assert len(self._spooled_now()) == 3
        assert await self.inbound.retry(time.time() + 60) == 3
        assert self._subjects() == ["m0", "m1", "m2", "m3"]
        assert self._spooled_now() == []

    @inline
    async def test_a_start_stores_the_spooled_messages_together(self) -> None:
        for n in range(5):
            await self._spooled(f"m{n}")
        self.publisher.hold = True
        started = Deferred.fromCoroutine(self.inbound.resume())
        await until(lambda: self.publisher.held)
        await until(lambda: self.inbound._stores.waiting == 4)
        self.publisher.hold = False
        self.publisher.failures = 1  # the second store call fails: those four stay spooled
        self.publisher.held[0].callback([None])
        assert await started == 5
        assert self.publisher.calls == [1, 4]
        assert len(self.flushLoggedErrors(OSError)) == 4  # each message's, logged
        assert len(self._spooled_now()) == 4
        assert await self.inbound.resume() == 4
        assert sum(self.publisher.calls[2:]) == 4  # each of the four stored once
        assert sorted(self._subjects()) == ["m0", "m1", "m2", "m3", "m4"]
        assert self._spooled_now() == []

    @inline
    async def test_the_kvs_names_are_durable_before_the_rows_that_name_them(self) -> None:
        # A stored row (and its event) names a KVS object: the object's directory entry
        # must be on disk first, or a crash leaves a row without its object. The
        # directory is fsync'd in the store's transaction, before that batch's rows.
        order: list[str] = []
        real_fsync = inbound_module.fsync_directory

        def fsync_directory(path: str) -> None:
            order.append(f"fsync {Path(path).name}")
            real_fsync(path)

        self.patch(inbound_module, "fsync_directory", fsync_directory)
        self.patch(self.mail, "received_tx", lambda r: lambda cur: order.append(f"row {r.sender}"))
        self.publisher.hold = True
        self.inbound.accepted(await self._spooled("m0"))
        await until(lambda: self.publisher.held)
        for n in (1, 2):
            self.inbound.accepted(await self._spooled(f"m{n}"))
        await until(lambda: self.inbound._stores.waiting == 2)
        self.publisher.hold = False
        self.publisher.held[0].callback([None])
        await until(lambda: self._spooled_now() == [])
        # One fsync a store call, each before its rows; no thread job of its own.
        assert order == ["fsync kvs", "row a@x.test", "fsync kvs", "row a@x.test", "row a@x.test"]
        assert [name for name, _ in self.jobs if name == "_sync_directory"] == []
