"""The durable spool: received messages are on disk, fsync'd, before the 250.

Layout under the spool directory:
- ``tmp/QID.eml``: a message being received (written line by line, never held whole
  in memory); removed if the session ends without a final 250, and at start.
- ``incoming/QID.eml``: a message accepted and not yet processed, its envelope in the
  file's extended attribute ``user.gehirn-ts.envelope``. At the final dot the envelope
  is set, the file fsync'd, renamed here and the directory fsync'd: the name in
  incoming/ is the commit point. A restart resumes every committed message
  (``pending``).
- ``orphaned/QID.eml``: a message file found without an envelope at start (``pending``).
- ``incoming/QID.json``: the envelope as a file of its own, where the file system keeps
  no extended attributes (tmpfs before Linux 6.6), for an envelope over
  ``ATTRIBUTE_BYTES``, and in spools of earlier versions. Written in tmp/ and renamed
  here after the message: its presence is the commit point.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred

from gehirn_ts.groupcommit import GroupCommit, Outcomes, fsync_directory
from gehirn_ts.logs import Logger
from gehirn_ts.threads import REACTOR_THREADS, ThreadRunner

log = Logger()

# One file a message instead of two: creating a file was the largest single cost of
# receiving one (docs/decisions.md, "The envelope on the spooled file").
ENVELOPE_ATTRIBUTE = "user.gehirn-ts.envelope"
# The largest envelope kept there (the probe's size): ext4 takes a value up to a block
# (4 KiB) less its headers. Larger ones (a few dozen recipients) get a file.
ATTRIBUTE_BYTES = 2048


_QID = re.compile(r"[0-9A-Z]{1,64}")


def new_queue_id() -> str:
    # Sortable by time, unique without coordination.
    return f"{int(time.time() * 1000):x}{secrets.token_hex(5)}".upper()


@dataclass
class Recipient:
    address: str
    notify: list[str] | None = None
    orcpt: list[str] | None = None  # [addr-type, address]


@dataclass
class Envelope:
    queue_id: str
    sender: str  # "" for the null reverse-path
    recipients: list[Recipient]
    size: int
    received_at: float
    client_ip: str
    helo: str
    listener: str
    tls: bool
    authenticated: str | None = None
    body: str | None = None  # 7BIT | 8BITMIME as declared
    ret: str | None = None
    envid: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        # vars(), not dataclasses.asdict: no deep copy of what is only serialised.
        out = dict(vars(self))
        out["recipients"] = [vars(r) for r in self.recipients]
        return _ENCODER.encode(out).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data = json.loads(raw)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        return cls(**data)


# Made once: json.dumps with options makes an encoder for every call. Compact, the
# fields in their order (sorted keys took half of the encoding).
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def unlink_quietly(path: str) -> None:
    """Remove a file; one already gone is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Commit(NamedTuple):
    """One message's files to make durable and rename."""

    fds: tuple[int, ...]
    moves: tuple[tuple[str, str], ...]  # (from, to), in this order
    envelope: bytes | None  # set on the first file, as its extended attribute


def _commit_files(directory: str, commits: list[_Commit]) -> Outcomes:
    """In a thread: for each commit, the envelope onto its first file, its files' data
    on disk, then their new names (in order); at last the directory that holds the
    names, once for all. A commit whose data did not get there is not renamed."""
    outcomes: Outcomes = []
    for commit in commits:
        try:
            if commit.envelope is not None:
                os.setxattr(commit.fds[0], ENVELOPE_ATTRIBUTE, commit.envelope)
            for fd in commit.fds:
                os.fsync(fd)
            for source, target in commit.moves:
                os.replace(source, target)
        except OSError as e:
            outcomes.append((False, e))
        else:
            outcomes.append((True, None))
    fsync_directory(directory)
    return outcomes


def keeps_attributes(directory: str) -> bool:
    """Whether a file in ``directory`` takes a user extended attribute the size of an
    envelope (ext4, XFS, Btrfs and ZFS do)."""
    if not hasattr(os, "setxattr"):
        return False  # not Linux
    probe = f"{directory}/.attribute-probe"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.setxattr(fd, ENVELOPE_ATTRIBUTE, b" " * ATTRIBUTE_BYTES)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(probe)


# What a message being received gathers before it is written: Python's buffered file
# would write every 4 KiB; a 100 KiB message in a few writes instead, and at most this
# much held for each session in DATA.
WRITE_BLOCK = 32 * 1024


def write_all(fd: int, data: bytes) -> None:
    """``data`` written to ``fd`` whole (a write may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_all(fd: int, expected: int) -> bytes:
    """What ``fd`` holds from where it stands to its end; ``expected``: about how much."""
    chunks = [os.read(fd, expected + 1)]
    while chunks[-1]:
        chunks.append(os.read(fd, max(expected, 64 * 1024)))
    return b"".join(chunks)


class Incoming:
    """One message being written to ``tmp/``.

    The file is an ``os.open`` descriptor, its data gathered here and written a block
    at a time. Python's ``open()`` adds an fstat, an ioctl and an lseek to the open,
    and under load each system call on the reactor thread is a turn of the
    interpreter lock given away and waited for (docs/performance.md)."""

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.path = f"{spool.tmp_dir}/{queue_id}.eml"
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._pending: list[bytes] = []
        self._pending_size = 0
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        self._pending.append(data)
        self._pending_size += len(data)
        self.size += len(data)
        if self._pending_size >= WRITE_BLOCK:
            self._write_pending(self._fd)

    def _write_pending(self, fd: int) -> None:
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        write_all(fd, data)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._pending.clear()
        unlink_quietly(self.path)

    def commit(self, envelope: Envelope) -> Deferred[None]:
        """Make the message durable; fires once it is (see ``Spool.commit``). A write
        that fails raises here, and the file is left to ``discard``."""
        assert self._fd is not None
        self._write_pending(self._fd)
        fd, self._fd = self._fd, None
        return Deferred.fromCoroutine(self.spool.commit(fd, self.path, envelope))


class Spool:
    def __init__(
        self,
        root: Path,
        threads: ThreadRunner = REACTOR_THREADS,
        attributes: bool | None = None,
        tmp: str = "tmp",
    ) -> None:
        """``attributes``: keep envelopes in the message files' extended attributes;
        None: where the file system allows it. ``tmp``: the directory of messages being
        received (an SMTP worker process has one of its own: ``tmp-N``)."""
        self.root = root
        self.threads = threads  # for the blocking file work of this spool and its readers
        self.tmp = root / tmp
        self.incoming = root / "incoming"
        # The per-message paths are made as strings: pathlib's parsing and formatting
        # were about a seventh of processing a received message (docs/performance.md).
        self.tmp_dir, self.incoming_dir = str(self.tmp), str(self.incoming)
        for d in (self.tmp, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        # Leftovers of sessions that died before their 250 were never acknowledged.
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)
        if attributes is None:
            attributes = keeps_attributes(self.tmp_dir)
            if not attributes:
                log.warn(
                    "the spool's file system ({path}) keeps no extended attributes: "
                    "each envelope is written to a file of its own, a second file "
                    "a message",
                    path=self.tmp_dir,
                )
        self.attributes = attributes
        # The commits that come in while one job makes others durable go together.
        self._commits: GroupCommit[_Commit] = GroupCommit(threads, _commit_files, self.incoming_dir)

    def begin(self) -> Incoming:
        return Incoming(self, new_queue_id())

    async def commit(self, fd: int, path: str, envelope: Envelope) -> None:
        """The message (``fd``, written to ``path`` in tmp/; closed here) with its
        envelope, fsync'd, then renamed into incoming/ (an envelope file after the
        message) and the directory fsync'd.

        Writes and closes only reach the page cache, and run here, on the reactor
        thread, as the DATA lines did. What waits for the disk goes to a worker thread,
        with the commits of other sessions that came in meanwhile (``GroupCommit``)."""
        qid = envelope.queue_id
        eml = f"{self.incoming_dir}/{qid}.eml"
        written: tuple[str, ...] = (eml,)
        data = envelope.to_json()
        try:
            try:
                if self.attributes and len(data) <= ATTRIBUTE_BYTES:
                    await self._commits.submit(_Commit((fd,), ((path, eml),), data))
                else:
                    env_tmp = f"{self.tmp_dir}/{qid}.json"
                    env = f"{self.incoming_dir}/{qid}.json"
                    written = (env_tmp, env, eml)  # the envelope first
                    with open(env_tmp, "xb") as e:
                        e.write(data)
                        e.flush()
                        moves = ((path, eml), (env_tmp, env))
                        await self._commits.submit(_Commit((fd, e.fileno()), moves, None))
            finally:
                os.close(fd)
        except BaseException:
            # Not acknowledged: nothing of it may be processed at the next start.
            for leftover in written:
                unlink_quietly(leftover)
            raise

    def pending(self) -> list[Envelope]:
        """Committed messages not yet processed, oldest first.

        A message file without an envelope was not committed by this spool: renamed
        before its envelope file by a start that died, or copied here by a tool that
        left its extended attributes behind (``rsync`` without ``-X``). It is moved
        to ``orphaned/``, as Postfix moves a queue file it cannot read to ``corrupt/``,
        and never deleted: in the second case it was acknowledged."""
        out = []
        for eml in sorted(self.incoming.glob("*.eml")):
            envelope = self._envelope(eml)
            if envelope is None:
                orphaned = self.root / "orphaned"
                orphaned.mkdir(exist_ok=True)
                os.replace(eml, orphaned / eml.name)
                log.warn(
                    "spooled {name} has no envelope; moved to {path} (docs/operations.md)",
                    name=eml.name,
                    path=str(orphaned),
                )
            else:
                out.append(envelope)
        # An envelope file whose message went was being removed.
        for env in self.incoming.glob("*.json"):
            if not env.with_suffix(".eml").exists():
                env.unlink(missing_ok=True)
        # An envelope write of an earlier version that did not finish.
        for tmp in self.incoming.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        return out

    @staticmethod
    def _envelope(eml: Path) -> Envelope | None:
        try:
            return Envelope.from_json(eml.with_suffix(".json").read_bytes())
        except FileNotFoundError:
            pass
        if not hasattr(os, "getxattr"):
            return None
        # Asked whatever this start's probe found: a spool written with attributes may
        # be resumed by a start whose probe failed (a full disk).
        try:
            return Envelope.from_json(os.getxattr(eml, ENVELOPE_ATTRIBUTE))
        except OSError as e:
            # None set (renamed here without one by an earlier version), or none kept
            # on this file system: never committed. Anything else is left to the
            # operator, and the message stays.
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                return None
            raise

    def count(self) -> int:
        """Messages in incoming/, processed or not yet (blocking: a directory scan)."""
        with os.scandir(self.incoming_dir) as entries:
            return sum(1 for entry in entries if entry.name.endswith(".eml"))

    def stale(self, before: float, limit: int | None = None) -> list[Envelope]:
        """The (first ``limit``) committed messages whose file was written before
        ``before`` (seconds since the epoch), oldest first (blocking: a directory
        scan). Unlike ``pending`` it moves nothing: a file without its envelope yet may
        be one an SMTP worker is committing (in the envelope-file layout, the message
        is renamed first)."""
        found: list[tuple[float, str]] = []
        with os.scandir(self.incoming_dir) as entries:
            for entry in entries:
                if not entry.name.endswith(".eml"):
                    continue
                try:
                    written = entry.stat().st_mtime
                except FileNotFoundError:
                    continue  # processed meanwhile
                if written < before:
                    found.append((written, entry.name[: -len(".eml")]))
        out: list[Envelope] = []
        for _, queue_id in sorted(found):
            if len(out) == limit:
                break
            envelope = self.load(queue_id)
            if envelope is not None:
                out.append(envelope)
        return out

    def load(self, queue_id: str) -> Envelope | None:
        """The envelope of a committed message; None if there is none (yet)."""
        if not _QID.fullmatch(queue_id):
            return None
        eml = f"{self.incoming_dir}/{queue_id}.eml"
        if self.attributes:
            # Where this spool keeps envelopes: asked first, without pathlib and
            # without the failed open of an envelope file (each message of an SMTP
            # worker is loaded so; docs/performance.md, session 19).
            try:
                return Envelope.from_json(os.getxattr(eml, ENVELOPE_ATTRIBUTE))
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return None
                if e.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
        elif not os.path.exists(eml):
            return None
        return self._envelope(Path(eml))

    def message_path(self, queue_id: str) -> Path:
        return self.incoming / f"{queue_id}.eml"

    def remove(self, queue_id: str) -> None:
        # An envelope file, where there is one, goes first: the commit point.
        unlink_quietly(f"{self.incoming_dir}/{queue_id}.json")
        unlink_quietly(f"{self.incoming_dir}/{queue_id}.eml")


@dataclass(frozen=True)
class Spooled:
    """A message in incoming/, as ``spooled`` lists it."""

    queue_id: str
    written: float  # its file's mtime
    size: int
    envelope: Envelope | None  # None: none (yet), or one that cannot be read


def spooled(root: Path) -> list[Spooled]:
    """The messages in ``root``/incoming/, oldest first, read only (for the CLI: a
    ``Spool`` clears tmp/ when it is made, which the daemon's sessions are writing)."""
    incoming = root / "incoming"
    out = []
    try:
        entries = list(os.scandir(incoming))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.name.endswith(".eml"):
            continue
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue  # processed meanwhile
        try:
            envelope = Spool._envelope(Path(entry.path))
        except (OSError, ValueError, TypeError, KeyError):
            envelope = None
        out.append(Spooled(entry.name[: -len(".eml")], stat.st_mtime, stat.st_size, envelope))
    return sorted(out, key=lambda m: (m.written, m.queue_id))
