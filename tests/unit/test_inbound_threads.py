"""Received mail's processing (mta/inbound.py): which of its work goes to a thread."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import succeed
from twisted.trial import unittest

from gehirn_ts.mta.dkim import DkimResult, is_signed
from gehirn_ts.mta.inbound import INLINE_BYTES, Inbound
from gehirn_ts.mta.spool import Spool
from tests.support import inline, recording_workers, spooled_envelope


class _Mail:
    def __init__(self) -> None:
        self.received: list[Any] = []

    async def record_received(self, received: Any) -> None:
        self.received.append(received)

    def received_tx(self, received: Any) -> Any:
        return lambda cursor: self.received.append(received)


class _Publisher:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish_many(self, events: list[Any], with_store: Any = None) -> Any:
        if with_store is not None:
            with_store(None)  # in the store's transaction
        self.events.extend(events)
        return succeed([None] * len(events))


def acme_inbound(spool: Spool, kvs: Path, mail: Any, publisher: Any, **kw: Any) -> Inbound:
    """Inbound on ``spool``, for which every domain is account acme's."""

    async def owner(domain: str) -> str | None:
        return "acme"

    return Inbound(
        spool=spool,
        kvs=kvs,
        mail=mail,
        publisher=publisher,
        owner=owner,
        hostname="mx.test",
        **kw,
    )


class ExamineTests(unittest.TestCase):
    def setUp(self) -> None:
        self.workers, self.jobs = recording_workers(self)
        root = Path(self.mktemp())
        self.spool = Spool(root / "spool", self.workers)
        self.kvs = root / "kvs"
        self.checked: list[bytes] = []

        def dkim_verify(message: bytes) -> list[DkimResult]:
            self.checked.append(message)
            return []

        self.mail, self.publisher = _Mail(), _Publisher()
        self.inbound = acme_inbound(
            self.spool, self.kvs, self.mail, self.publisher, dkim_verify=dkim_verify
        )

    async def _spooled(self, message: bytes) -> tuple[str, Any]:
        """(queue id, envelope) of ``message``, committed to the spool."""
        incoming = self.spool.begin()
        incoming.write(message)
        envelope = spooled_envelope(incoming)
        await incoming.commit(envelope)
        return incoming.queue_id, envelope

    async def _receive(self, message: bytes) -> str:
        qid, envelope = await self._spooled(message)
        self.jobs.clear()
        await self.inbound.process(envelope)
        return qid

    @inline
    async def test_a_small_unsigned_message_gives_the_threads_only_its_fsyncs(self) -> None:
        message = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n"
        qid = await self._receive(message)
        # No thread job at all: the KVS directory's fsync goes with the store's
        # transaction (test_inbound_batches.py).
        assert self.jobs == []
        assert (self.kvs / f"{qid}.eml").read_bytes() == message
        # Our Authentication-Results field is kept with the index row.
        [received] = self.mail.received
        field = received.meta["authentication_results"]
        assert field == "Authentication-Results: mx.test; dkim=none\r\n"
        assert self.checked == [] and [e.data["subject"] for e in self.publisher.events] == ["hi"]
        assert list(self.kvs.iterdir()) == [self.kvs / f"{qid}.eml"]
        assert list(self.spool.incoming.iterdir()) == []  # processed: out of the spool

    @inline
    async def test_the_kvs_object_is_the_spooled_file_not_a_copy(self) -> None:
        qid, envelope = await self._spooled(b"From: a@x.test\r\n\r\nbody\r\n")
        spooled = os.stat(self.spool.message_path(qid))
        await self.inbound.process(envelope)
        stored = os.stat(self.kvs / f"{qid}.eml")
        assert (stored.st_dev, stored.st_ino) == (spooled.st_dev, spooled.st_ino)

    @inline
    async def test_without_hard_links_the_object_is_a_copy_on_disk(self) -> None:
        def no_link(source: str, target: str) -> None:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        self.patch(os, "link", no_link)
        message = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n"
        qid = await self._receive(message)
        assert [name for name, _ in self.jobs] == ["_copy_object"]
        assert (self.kvs / f"{qid}.eml").read_bytes() == message
        assert list(self.kvs.iterdir()) == [self.kvs / f"{qid}.eml"]  # no temporary left

    @inline
    async def test_a_repeat_finds_the_object_there_and_keeps_it(self) -> None:
        # A crash after the link and before the spool was emptied: the next start
        # processes the message again.
        qid, envelope = await self._spooled(b"From: a@x.test\r\n\r\nbody\r\n")
        self.kvs.mkdir(exist_ok=True)
        target = self.kvs / f"{qid}.eml"
        os.link(self.spool.message_path(qid), target)
        self.jobs.clear()
        await self.inbound.process(envelope)
        assert self.jobs == []
        assert target.read_bytes() == b"From: a@x.test\r\n\r\nbody\r\n"
        assert len(self.mail.received) == 1

    @inline
    async def test_a_signed_message_is_checked_in_a_thread(self) -> None:
        message = b"DKIM-Signature: v=1; d=x.test\r\nFrom: a@x.test\r\n\r\nbody\r\n"
        await self._receive(message)
        assert [name for name, _ in self.jobs] == ["dkim_verify"]
        assert self.checked == [message]

    @inline
    async def test_a_large_message_is_read_and_copied_in_a_thread(self) -> None:
        message = b"From: a@x.test\r\nSubject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
        message += b"y" * 998 + b"\r\n"
        message = message * (INLINE_BYTES // len(message) + 1)
        qid = await self._receive(message)
        assert [name for name, _ in self.jobs] == ["_examine", "remove"]
        assert (self.kvs / f"{qid}.eml").read_bytes() == message
        assert list(self.spool.incoming.iterdir()) == []
        assert self.checked == []  # not signed: never read whole

    @inline
    async def test_a_large_signed_message_is_checked_whole(self) -> None:
        message = b"DKIM-Signature: v=1; d=x.test\r\nFrom: a@x.test\r\n\r\n"
        message += (b"y" * 998 + b"\r\n") * (INLINE_BYTES // 1000 + 1)
        await self._receive(message)
        assert self.checked == [message]


def test_is_signed_looks_at_the_header_section_only() -> None:
    assert is_signed(b"From: a\r\nDKIM-Signature: v=1\r\n\r\nbody")
    assert is_signed(b"dkim-signature\t: v=1\r\n\r\n")
    assert not is_signed(b"From: a\r\nSubject: DKIM-Signature: no\r\n\r\nDKIM-Signature: x\r\n")
