"""A scripted SMTP server for client tests: its replies are planned per command, and it
records every command and message it got."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver


@dataclass
class Script:
    extensions: list[str] = field(default_factory=lambda: ["PIPELINING", "8BITMIME", "DSN"])
    # Replies per command word, used in turn (then the default 250 / 354).
    plan: dict[str, list[str]] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    sessions: int = 0
    # When set, the reply to the end of DATA waits for it (``held`` counts the waiting).
    hold: Any = None
    held: int = 0
    open: int = 0
    concurrent_peak: int = 0

    def reply(self, word: str, default: str) -> str:
        queue = self.plan.get(word)
        return queue.pop(0) if queue else default


class _Server(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self, script: Script) -> None:
        self.script = script
        self.data: list[bytes] | None = None

    def connectionMade(self) -> None:
        self.script.sessions += 1
        self.script.open += 1
        self.script.concurrent_peak = max(self.script.concurrent_peak, self.script.open)
        self.sendLine(self.script.reply("CONNECT", "220 scripted ESMTP").encode())

    def lineReceived(self, line: bytes) -> None:
        if self.data is not None:
            if line == b".":
                data, self.data = b"".join(self.data), None
                reply = self.script.reply(".", "250 2.0.0 Ok: queued").encode()
                if self.script.hold is not None and not self.script.hold.called:
                    self.script.held += 1

                    def release(_: Any) -> Any:
                        self.script.held -= 1
                        self.script.messages.append(data)
                        self.sendLine(reply)
                        return _

                    self.script.hold.addCallback(release)
                else:
                    self.script.messages.append(data)
                    self.sendLine(reply)
            else:
                # RFC 5321 section 4.5.2: the client doubled a leading dot.
                self.data.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
            return
        text = line.decode()
        self.script.commands.append(text)
        word = text.split(" ", 1)[0].split(":", 1)[0].upper()
        if word == "EHLO":
            lines = ["scripted", *self.script.extensions]
            for i, ext in enumerate(lines):
                sep = " " if i == len(lines) - 1 else "-"
                self.sendLine(f"250{sep}{ext}".encode())
        elif word == "DATA":
            reply = self.script.reply("DATA", "354 go ahead")
            if reply.startswith("354"):
                self.data = []
            self.sendLine(reply.encode())
        elif word == "QUIT":
            self.sendLine(b"221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(self.script.reply(word, "250 2.0.0 Ok").encode())

    def connectionLost(self, reason: Any = None) -> None:
        self.script.open -= 1


def listen(testcase: Any, script: Script, interface: str = "127.0.0.1", port: int = 0) -> int:
    factory = Factory.forProtocol(lambda: _Server(script))
    listening = reactor.listenTCP(port, factory, interface=interface)
    testcase.addCleanup(listening.stopListening)
    return int(listening.getHost().port)
