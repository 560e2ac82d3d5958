"""A real IRC server for the tests: ngircd on a free port with its own configuration,
and a plain IRC client that sits in a channel and records what it hears."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.words.protocols import irc

from tests.support import free_port, until

NGIRCD = shutil.which("ngircd") or "/usr/sbin/ngircd"
CONFIG = """[Global]
    Name = irc.gehirn.test
    Info = gehirn-ts test server
    Listen = 127.0.0.1
    Ports = {port}
    MotdPhrase = tests only
    PidFile = {dir}/ngircd.pid
    ServerUID = {uid}
    ServerGID = {gid}
    Password = {password}
{ssl}
[Limits]
    MaxNickLength = 30
    PingTimeout = {ping}
    PongTimeout = {pong}
[Options]
    PAM = no
    Ident = no
    DNS = no
"""


class Ngircd:
    def __init__(
        self,
        port: int | None = None,
        password: str = "",
        tls_port: int | None = None,
        ping: int = 120,
        pong: int = 20,
    ) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gehirn-ngircd-"))
        os.chmod(self.dir, 0o777)
        uid = "nobody" if os.geteuid() == 0 else str(os.geteuid())
        gid = "nogroup" if os.geteuid() == 0 else str(os.getegid())
        self.conf = self.dir / "ngircd.conf"
        ssl = ""
        self.tls_port = tls_port
        if tls_port is not None:
            from gehirn_ts.mta.tls import make_self_signed

            make_self_signed(self.dir / "cert.pem", self.dir / "key.pem", "irc.gehirn.test")
            for name in ("cert.pem", "key.pem"):
                os.chmod(self.dir / name, 0o644)  # read after ngircd drops privileges
            ssl = (
                f"[SSL]\n    CertFile = {self.dir}/cert.pem\n    KeyFile = {self.dir}/key.pem\n"
                f"    Ports = {tls_port}\n"
            )
        self.conf.write_text(
            CONFIG.format(
                port=self.port,
                dir=self.dir,
                uid=uid,
                gid=gid,
                password=password,
                ssl=ssl,
                ping=ping,
                pong=pong,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Ngircd:
        self.proc = subprocess.Popen(
            [NGIRCD, "--nodaemon", "--config", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import socket

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("ngircd did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Listener(irc.IRCClient):
    """Joins channels and records (kind, channel, text, time) of what it hears."""

    lineRate = None

    def __init__(self, nick: str, channels: list[str], password: str | None = None) -> None:
        self.nickname = nick
        self.password = password
        self.channels_wanted = channels
        self.joined_channels: set[str] = set()
        self.heard: list[tuple[str, str, str, float]] = []
        self.lost = False

    def signedOn(self) -> None:
        for channel in self.channels_wanted:
            self.join(channel)

    def joined(self, channel: str) -> None:
        self.joined_channels.add(channel)

    def privmsg(self, user: str, channel: str, message: str) -> None:
        self.heard.append(("PRIVMSG", channel, message, reactor.seconds()))

    def noticed(self, user: str, channel: str, message: str) -> None:
        self.heard.append(("NOTICE", channel, message, reactor.seconds()))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        irc.IRCClient.connectionLost(self, reason)

    def texts(self) -> list[str]:
        return [h[2] for h in self.heard]


async def listen(
    testcase: Any, server: Ngircd, nick: str, *channels: str, password: str | None = None
) -> Listener:
    listener = Listener(nick, list(channels), password)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), listener)

    def close() -> None:
        if listener.transport is not None:
            listener.transport.loseConnection()

    testcase.addCleanup(close)
    await until(lambda: listener.joined_channels >= set(channels))
    return listener
