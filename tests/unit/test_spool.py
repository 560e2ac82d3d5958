"""The spool's commit point: each message with its envelope, in an extended attribute of
the message file or in a file beside it."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from gehirn_ts.mta import spool as spool_module
from gehirn_ts.mta.spool import ENVELOPE_ATTRIBUTE, Envelope, Recipient, Spool, keeps_attributes
from tests.support import inline, spooled_envelope

MESSAGE = b"Subject: x\r\n\r\nbody\r\n"


class SpoolTests(unittest.TestCase):
    def _spool(self, attributes: bool | None = None) -> Spool:
        return Spool(Path(self.mktemp()), attributes=attributes)

    def _attribute_spool(self, root: Path | None = None) -> Spool:
        """A spool that keeps envelopes in attributes; the test is skipped where the
        file system keeps none."""
        spool = Spool(root or Path(self.mktemp()))
        if not keeps_attributes(spool.tmp_dir):
            self.skipTest("this file system keeps no user extended attributes")
        return spool

    def _resumed_then_removed(self, spool: Spool, envelope: Envelope) -> None:
        """``envelope`` is the one message resumed; removing it empties the spool."""
        assert spool.pending() == [envelope]
        spool.remove(envelope.queue_id)
        assert list(spool.incoming.iterdir()) == []

    async def _commit(self, spool: Spool, envelope: Any = None) -> Envelope:
        incoming = spool.begin()
        incoming.write(MESSAGE)
        envelope = envelope or spooled_envelope(incoming)
        await incoming.commit(envelope)
        return envelope  # type: ignore[no-any-return]

    @inline
    async def test_the_envelope_rides_on_the_message_file_where_the_file_system_allows(
        self,
    ) -> None:
        spool = self._attribute_spool()
        assert spool.attributes
        envelope = await self._commit(spool)
        qid = envelope.queue_id
        # One file a message: the envelope is in its attribute, no file beside it.
        assert sorted(p.name for p in spool.incoming.iterdir()) == [f"{qid}.eml"]
        kept = os.getxattr(spool.message_path(qid), ENVELOPE_ATTRIBUTE)
        assert Envelope.from_json(kept) == envelope
        self._resumed_then_removed(spool, envelope)
        assert spool.pending() == []

    @inline
    async def test_a_start_whose_probe_fails_still_resumes_what_has_attributes(self) -> None:
        root = Path(self.mktemp())
        spool = self._attribute_spool(root)
        envelope = await self._commit(spool)
        # The next start's probe fails (a full disk, say): the committed message and
        # its envelope are still found.
        again = Spool(root, attributes=False)
        assert again.pending() == [envelope]
        assert again.message_path(envelope.queue_id).exists()

    @inline
    async def test_a_message_copied_without_its_attribute_is_kept_aside(self) -> None:
        spool = self._attribute_spool()
        envelope = await self._commit(spool)
        path = spool.message_path(envelope.queue_id)
        # What `rsync -a` without -X leaves of an acknowledged message.
        os.removexattr(path, ENVELOPE_ATTRIBUTE)
        warnings: list[dict[str, Any]] = []
        self.patch(spool_module.log, "warn", lambda fmt, **kw: warnings.append(kw))
        assert spool.pending() == []
        kept = spool.root / "orphaned" / path.name
        assert kept.read_bytes() == MESSAGE and not path.exists()
        assert [w["name"] for w in warnings] == [path.name]

    @inline
    async def test_without_attributes_each_envelope_is_a_file_beside_its_message(
        self,
    ) -> None:
        spool = self._spool(attributes=False)
        envelope = await self._commit(spool)
        qid = envelope.queue_id
        assert sorted(p.name for p in spool.incoming.iterdir()) == [f"{qid}.eml", f"{qid}.json"]
        self._resumed_then_removed(spool, envelope)

    @inline
    async def test_an_envelope_too_large_for_the_attribute_gets_a_file(self) -> None:
        spool = self._attribute_spool()
        incoming = spool.begin()
        incoming.write(MESSAGE)
        envelope = spooled_envelope(incoming)
        envelope.recipients = [Recipient(f"user{n}@y.test", ["SUCCESS"]) for n in range(100)]
        assert len(envelope.to_json()) > spool_module.ATTRIBUTE_BYTES
        await incoming.commit(envelope)
        qid = envelope.queue_id
        assert (spool.incoming / f"{qid}.json").exists()
        self._resumed_then_removed(spool, envelope)

    @inline
    async def test_a_spool_of_an_earlier_version_resumes_what_it_committed(self) -> None:
        spool = self._spool()
        # Written by a version that kept every envelope in a file: a committed message,
        # one renamed without its envelope (never acknowledged), an envelope whose
        # message was already removed, and an unfinished envelope write.
        old = Envelope(
            "0001",
            "a@x.test",
            [Recipient("b@y.test")],
            20,
            0.0,
            "192.0.2.1",
            "x.test",
            "smtp",
            False,
        )
        (spool.incoming / "0001.eml").write_bytes(MESSAGE)
        (spool.incoming / "0001.json").write_bytes(old.to_json())
        (spool.incoming / "0002.eml").write_bytes(MESSAGE)
        (spool.incoming / "0003.json").write_bytes(old.to_json())
        (spool.incoming / ".0004.json.tmp").write_bytes(b"{")
        newer = await self._commit(spool)
        assert spool.pending() == [old, newer]
        assert sorted(p.name for p in spool.incoming.iterdir()) == sorted(
            ["0001.eml", "0001.json", f"{newer.queue_id}.eml"]
            + ([] if spool.attributes else [f"{newer.queue_id}.json"])
        )
        # The message without an envelope is kept aside, not deleted.
        assert [p.name for p in (spool.root / "orphaned").iterdir()] == ["0002.eml"]
        spool.remove("0001")
        assert spool.pending() == [newer]

    @inline
    async def test_a_file_system_that_refuses_attributes_gets_envelope_files(self) -> None:
        def refused(*args: Any) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        warnings: list[dict[str, Any]] = []
        self.patch(os, "setxattr", refused)
        self.patch(spool_module.log, "warn", lambda fmt, **kw: warnings.append(kw))
        spool = self._spool()
        assert not spool.attributes
        assert [w["path"] for w in warnings] == [spool.tmp_dir]
        envelope = await self._commit(spool)
        assert (spool.incoming / f"{envelope.queue_id}.json").exists()
        assert spool.pending() == [envelope]
        # The probe leaves nothing behind.
        assert list(spool.tmp.iterdir()) == []

    @inline
    async def test_load_finds_an_envelope_wherever_it_is_kept(self) -> None:
        """What an SMTP worker spooled, read by the main process: from the attribute,
        from a file beside a large envelope, from a file where there are no
        attributes; a queue id that is not spooled, or no queue id, is no envelope."""
        spool = self._attribute_spool()
        small = await self._commit(spool)
        assert spool.load(small.queue_id) == small
        incoming = spool.begin()
        incoming.write(MESSAGE)
        large = spooled_envelope(incoming)
        large.recipients = [Recipient(f"user{n}@y.test", ["SUCCESS"]) for n in range(100)]
        await incoming.commit(large)
        assert spool.load(large.queue_id) == large
        plain = self._spool(attributes=False)
        kept = await self._commit(plain)
        assert plain.load(kept.queue_id) == kept
        # Two workers' spools share incoming/, each with a tmp directory of its own.
        other = Spool(spool.root, attributes=spool.attributes, tmp="tmp-1")
        theirs = await self._commit(other)
        assert other.tmp_dir != spool.tmp_dir and spool.load(theirs.queue_id) == theirs
        assert spool.load("0123456789ABCDEF") is None
        assert spool.load("../gehirn-ts.sqlite") is None

    @inline
    async def test_the_cli_listing_reads_both_layouts_and_moves_nothing(self) -> None:
        root = Path(self.mktemp())
        in_attribute = await self._commit(self._attribute_spool(root))
        in_file = await self._commit(Spool(root, attributes=False))
        bare = root / "incoming" / "1BARE.eml"
        bare.write_bytes(MESSAGE)
        broken = root / "incoming" / "1BROKEN.eml"
        broken.write_bytes(MESSAGE)
        os.setxattr(broken, ENVELOPE_ATTRIBUTE, b"{not json")
        for n, path in enumerate(
            (
                root / "incoming" / f"{in_attribute.queue_id}.eml",
                root / "incoming" / f"{in_file.queue_id}.eml",
                bare,
                broken,
            )
        ):
            os.utime(path, (1000.0 + n, 1000.0 + n))
        listed = spool_module.spooled(root)
        assert [(m.queue_id, m.envelope) for m in listed] == [
            (in_attribute.queue_id, in_attribute),
            (in_file.queue_id, in_file),
            ("1BARE", None),
            ("1BROKEN", None),
        ]
        assert listed[0].size == len(MESSAGE) and listed[0].written == 1000.0
        assert bare.exists() and broken.exists()  # nothing moved to orphaned/
        assert spool_module.spooled(Path(self.mktemp())) == []
