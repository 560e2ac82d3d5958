"""The twisted.mail peer for the SMTP benchmark: the stock ESMTP server of the stack
gehirn-ts is built on, writing and fsyncing each message (file and directory, in a
thread) before its 250, and nothing else: no KVS, no event, no checks. What the
stack itself costs a message, beside what gehirn-ts does with it."""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from twisted.internet import endpoints, reactor, threads
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class Message:
    def __init__(self, directory: str, dirfd: int) -> None:
        self.directory = directory
        self.dirfd = dirfd
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> Any:
        data = b"\r\n".join(self.lines) + b"\r\n"
        return threads.deferToThread(self._write, data)

    def _write(self, data: bytes) -> bytes:
        path = os.path.join(self.directory, f"{secrets.token_hex(8)}.eml")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(self.dirfd)  # the new name too, as gehirn-ts's spool
        return b"queued"

    def connectionLost(self) -> None:
        self.lines = []


@implementer(smtp.IMessageDelivery)
class Delivery:
    def __init__(self, directory: str, dirfd: int) -> None:
        self.directory = directory
        self.dirfd = dirfd

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return lambda: Message(self.directory, self.dirfd)


class Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory
        self.dirfd = os.open(directory, os.O_RDONLY)

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        proto.delivery = Delivery(self.directory, self.dirfd)
        proto.host = b"twisted.bench"
        return proto


if __name__ == "__main__":
    port, directory = int(sys.argv[1]), sys.argv[2]
    os.makedirs(directory, exist_ok=True)
    endpoint = endpoints.serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
    endpoint.listen(Factory(directory)).addCallback(lambda _: print("ready", flush=True))
    reactor.run()  # type: ignore[attr-defined]
