"""The durable spool: received messages are on disk, fsync'd, before the 250.

Layout under the spool directory:
- ``tmp/QID.eml``: a message being received (written line by line, never held whole
  in memory); removed if the session ends without a final 250.
- ``incoming/QID.eml`` + ``incoming/QID.json``: a message accepted and not yet processed.
  The envelope file is renamed into place last and the directory fsync'd: its presence
  is the commit point. A restart resumes every committed message (``pending``).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred

from gehirn_ts.threads import REACTOR_THREADS, ThreadRunner


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
        return json.dumps(out, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        data = json.loads(raw)
        data["recipients"] = [Recipient(**r) for r in data["recipients"]]
        return cls(**data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file, fsync'd, renamed, and the
    directory fsync'd (blocking: call in a thread)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Incoming:
    """One message being written to ``tmp/``."""

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.path = spool.tmp / f"{queue_id}.eml"
        self._file: IO[bytes] | None = self.path.open("xb")
        self.size = 0

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self.size += len(data)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)

    def commit(self, envelope: Envelope) -> Deferred[None]:
        """Make the message durable (in a thread: fsync blocks)."""
        f, self._file = self._file, None
        assert f is not None
        return self.spool.threads.run(self.spool._commit, f, self.path, envelope)


class Spool:
    def __init__(self, root: Path, threads: ThreadRunner = REACTOR_THREADS) -> None:
        self.root = root
        self.threads = threads  # for the blocking file work of this spool and its readers
        self.tmp = root / "tmp"
        self.incoming = root / "incoming"
        for d in (self.tmp, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        # Leftovers of sessions that died before their 250 were never acknowledged.
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def begin(self) -> Incoming:
        return Incoming(self, new_queue_id())

    def _commit(self, f: IO[bytes], path: Path, envelope: Envelope) -> None:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        qid = envelope.queue_id
        os.replace(path, self.incoming / f"{qid}.eml")
        # The envelope goes in last: its presence is the commit point.
        write_durably(self.incoming / f"{qid}.json", envelope.to_json())

    def pending(self) -> list[Envelope]:
        """Committed messages not yet processed, oldest first."""
        out = []
        for env in sorted(self.incoming.glob("*.json")):
            out.append(Envelope.from_json(env.read_bytes()))
        # Message files without an envelope were never acknowledged; a .tmp is an
        # envelope write that did not finish.
        for tmp in self.incoming.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        committed = {e.queue_id for e in out}
        for eml in self.incoming.glob("*.eml"):
            if eml.stem not in committed:
                eml.unlink(missing_ok=True)
        return out

    def message_path(self, queue_id: str) -> Path:
        return self.incoming / f"{queue_id}.eml"

    def remove(self, queue_id: str) -> None:
        (self.incoming / f"{queue_id}.json").unlink(missing_ok=True)
        (self.incoming / f"{queue_id}.eml").unlink(missing_ok=True)
