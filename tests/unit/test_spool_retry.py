"""Received mail left in the spool while the daemon runs is processed again
(``Spool.stale``, ``Inbound.retry``, the ``_Resume`` service of tap.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest

from gehirn_ts.metrics import Metrics
from gehirn_ts.mta import inbound as inbound_module
from gehirn_ts.mta.spool import Envelope, Spool
from gehirn_ts.store.db import Conflict
from gehirn_ts.tap import STALE_AFTER, _Resume
from tests.support import inline, recording_workers, spooled_envelope, until
from tests.unit.test_inbound_threads import _Mail, acme_inbound


class _FlakyPublisher:
    """Fails the first ``failures`` publishes (a store that failed for a while); can
    also hold every publish until released."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.events: list[Any] = []
        self.held: list[Deferred[list[Any]]] = []
        self.hold = False
        self.calls: list[int] = []  # how many events each publish carried
        self.conflicting: set[str] = set()  # subjects whose event id is taken

    def publish_many(self, events: list[Any], with_store: Any = None) -> Deferred[list[Any]]:
        self.calls.append(len(events))
        if self.failures:
            self.failures -= 1
            return fail(OSError("disk I/O error"))
        if with_store is not None:
            with_store(None)
        taken = [e.data["subject"] in self.conflicting for e in events]
        self.events.extend(e for e, t in zip(events, taken, strict=True) if not t)
        done = [Conflict("id", "taken") if t else None for t in taken]
        if self.hold:
            d: Deferred[list[None]] = Deferred()
            self.held.append(d)
            return d
        return succeed(done)


class SpoolCase(unittest.TestCase):
    """A spool, a KVS and an Inbound on them that publishes to a ``_FlakyPublisher``."""

    def setUp(self) -> None:
        self.workers, self.jobs = recording_workers(self)
        root = Path(self.mktemp())
        self.spool = Spool(root / "spool", self.workers)
        self.kvs = root / "kvs"
        self.mail, self.publisher = _Mail(), _FlakyPublisher()
        self.inbound = acme_inbound(self.spool, self.kvs, self.mail, self.publisher)

    async def _spooled(
        self, subject: str, age: float = 0.0, written: float | None = None
    ) -> Envelope:
        """A committed message, its file written ``age`` seconds ago (or at ``written``)."""
        incoming = self.spool.begin()
        incoming.write(f"From: a@x.test\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
        envelope: Envelope = spooled_envelope(incoming)
        await incoming.commit(envelope)
        if written is None:
            written = time.time() - age
        os.utime(self.spool.message_path(envelope.queue_id), (written, written))
        return envelope

    def _subjects(self) -> list[str]:
        return [e.data["subject"] for e in self.publisher.events]


class SpoolRetryTests(SpoolCase):
    @inline
    async def test_stale_lists_the_old_committed_messages_oldest_first(self) -> None:
        older = await self._spooled("older", age=300)
        old = await self._spooled("old", age=120)
        await self._spooled("fresh")
        # A message file whose envelope is not there yet (a worker committing in the
        # envelope-file layout renames the message first): listed no more, and not
        # moved away as a start's ``pending`` would.
        bare = self.spool.incoming / "1ABC.eml"
        bare.write_bytes(b"Subject: half\r\n\r\n")
        os.utime(bare, (time.time() - 600, time.time() - 600))
        found = self.spool.stale(time.time() - STALE_AFTER)
        assert [e.queue_id for e in found] == [older.queue_id, old.queue_id]
        assert found[0] == older
        assert self.spool.stale(time.time() - STALE_AFTER, 1) == [older]
        assert bare.exists()

    @inline
    async def test_a_message_whose_processing_failed_is_processed_by_the_retry(self) -> None:
        self.publisher.failures = 1
        envelope = await self._spooled("again", age=120)
        with self.assertRaises(OSError):
            await self.inbound.process(envelope)
        assert self.spool.message_path(envelope.queue_id).exists()  # still spooled
        assert await self.inbound.retry(time.time() - STALE_AFTER) == 1
        assert self._subjects() == ["again"]
        assert (self.kvs / f"{envelope.queue_id}.eml").exists()
        assert list(self.spool.incoming.iterdir()) == []
        # Nothing left: the next look finds nothing to do.
        assert await self.inbound.retry(time.time()) == 0
        assert self._subjects() == ["again"]

    @inline
    async def test_a_look_goes_batch_by_batch_and_stops_at_a_failure(self) -> None:
        self.patch(inbound_module, "RETRY_BATCH", 2)
        for n in range(5):
            await self._spooled(f"m{n}", age=300 - n)
        self.publisher.failures = 2  # the first batch fails: the look ends there
        assert await self.inbound.retry(time.time()) == 0
        assert self._subjects() == []
        # One traceback for the look, not one a message.
        assert len(self.flushLoggedErrors(OSError)) == 1
        assert await self.inbound.retry(time.time()) == 5  # three batches
        assert self._subjects() == ["m0", "m1", "m2", "m3", "m4"]

    @inline
    async def test_a_message_being_processed_is_left_to_that_processing(self) -> None:
        envelope = await self._spooled("busy", age=120)
        self.publisher.hold = True
        first = Deferred.fromCoroutine(self.inbound.process(envelope))
        await until(lambda: self.publisher.held)
        assert await self.inbound.retry(time.time()) == 0
        assert self._subjects() == ["busy"]  # published once
        self.publisher.held[0].callback([None])
        await first
        assert list(self.spool.incoming.iterdir()) == []

    @inline
    async def test_the_spool_gauge_counts_what_is_not_processed_yet(self) -> None:
        metrics = Metrics()
        inbound = acme_inbound(self.spool, self.kvs, self.mail, self.publisher, metrics=metrics)
        first = await self._spooled("one")
        await self._spooled("two")
        await metrics.refresh()
        assert b"gehirn_spool_messages 2.0" in metrics.render()
        await inbound.process(first)
        await metrics.refresh()
        assert b"gehirn_spool_messages 1.0" in metrics.render()

    @inline
    async def test_the_service_looks_again_every_interval(self) -> None:
        clock = Clock()
        clock.advance(time.time())
        self.publisher.failures = 1  # the start's resume fails on the one message
        stuck = await self._spooled("stuck", age=120)
        service = _Resume(self.inbound, 300.0, clock)
        service.startService()
        self.addCleanup(service.stopService)
        await until(lambda: service._loop is not None)
        assert self.spool.message_path(stuck.queue_id).exists()
        # Written just before the next look: younger than STALE_AFTER then, so left
        # for the one after it.
        fresh = await self._spooled("fresh", written=clock.seconds() + 290)
        clock.advance(299)
        assert self._subjects() == []
        clock.advance(1)
        await until(lambda: self._subjects() == ["stuck"])
        assert self.spool.message_path(fresh.queue_id).exists()
        clock.advance(300)
        await until(lambda: self._subjects() == ["stuck", "fresh"])
        assert list(self.spool.incoming.iterdir()) == []
        assert len(self.flushLoggedErrors(OSError)) == 1  # the start's failure

    @inline
    async def test_an_interval_of_zero_looks_only_at_start(self) -> None:
        clock = Clock()
        clock.advance(time.time())
        self.publisher.failures = 1
        await self._spooled("stuck", age=120)
        service = _Resume(self.inbound, 0.0, clock)
        service.startService()
        self.addCleanup(service.stopService)
        await until(lambda: self.publisher.failures == 0)
        clock.advance(3600)
        assert service._loop is None and self._subjects() == []
        assert len(self.flushLoggedErrors(OSError)) == 1
