"""Received mail's processing (mta/inbound.py): which of its work goes to a thread."""

from __future__ import annotations

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


class _Publisher:
    def __init__(self) -> None:
        self.events: list[Any] = []

    def publish(self, event: Any) -> Any:
        self.events.append(event)
        return succeed(None)


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

        async def owner(domain: str) -> str | None:
            return "acme"

        self.inbound = Inbound(
            spool=self.spool,
            kvs=self.kvs,
            mail=self.mail,  # type: ignore[arg-type]
            publisher=self.publisher,  # type: ignore[arg-type]
            owner=owner,
            hostname="mx.test",
            dkim_verify=dkim_verify,
        )

    async def _receive(self, message: bytes) -> str:
        incoming = self.spool.begin()
        incoming.write(message)
        envelope = spooled_envelope(incoming)
        await incoming.commit(envelope)
        self.jobs.clear()
        await self.inbound.process(envelope)
        return incoming.queue_id

    @inline
    async def test_a_small_unsigned_message_gives_the_threads_only_its_fsyncs(self) -> None:
        message = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n"
        qid = await self._receive(message)
        # The KVS object's fsyncs and rename in one job, and nothing else.
        assert [name for name, _ in self.jobs] == ["_commit_object"]
        assert all(thread.startswith("io-") for _, thread in self.jobs)
        stored = (self.kvs / f"{qid}.eml").read_bytes()
        assert stored.startswith(b"Authentication-Results: mx.test") and stored.endswith(message)
        assert self.checked == [] and [e.data["subject"] for e in self.publisher.events] == ["hi"]
        assert list(self.kvs.iterdir()) == [self.kvs / f"{qid}.eml"]
        assert list(self.spool.incoming.iterdir()) == []  # processed: out of the spool

    @inline
    async def test_a_signed_message_is_checked_in_a_thread(self) -> None:
        message = b"DKIM-Signature: v=1; d=x.test\r\nFrom: a@x.test\r\n\r\nbody\r\n"
        await self._receive(message)
        assert [name for name, _ in self.jobs] == ["dkim_verify", "_commit_object"]
        assert self.checked == [message]

    @inline
    async def test_a_large_message_is_read_and_copied_in_a_thread(self) -> None:
        message = b"From: a@x.test\r\nSubject: big\r\n\r\n" + b"x" * 998 + b"\r\n"
        message += b"y" * 998 + b"\r\n"
        message = message * (INLINE_BYTES // len(message) + 1)
        qid = await self._receive(message)
        assert [name for name, _ in self.jobs] == ["_examine", "remove"]
        assert (self.kvs / f"{qid}.eml").read_bytes().endswith(message)
        assert list(self.spool.incoming.iterdir()) == []


def test_is_signed_looks_at_the_header_section_only() -> None:
    assert is_signed(b"From: a\r\nDKIM-Signature: v=1\r\n\r\nbody")
    assert is_signed(b"dkim-signature\t: v=1\r\n\r\n")
    assert not is_signed(b"From: a\r\nSubject: DKIM-Signature: no\r\n\r\nDKIM-Signature: x\r\n")
