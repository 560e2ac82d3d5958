"""SASL PLAIN (IRCv3) for the IRC bot, against a scripted IRC server on loopback: ngircd,
the real server of the other IRC tests, has no SASL."""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import TestCase

from gehirn_ts.edj.destinations.irc import IrcDestination, IrcNetwork, parse_irc_url
from gehirn_ts.edj.netguard import AddressPolicy
from gehirn_ts.interfaces import Delivered, PermFail
from tests.support import inline, until


class SaslServer(LineReceiver):
    """Registration waits for CAP END; AUTHENTICATE PLAIN checks bot:s3cret."""

    delimiter = b"\r\n"

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.nick = "*"
        self.ended = False

    def lineReceived(self, line: bytes) -> None:
        text = line.decode()
        self.log.append(text)
        cmd, _, rest = text.partition(" ")
        if cmd == "CAP" and rest.startswith("REQ"):
            self.sendLine(b":irc.test CAP * ACK :sasl")
        elif cmd == "AUTHENTICATE" and rest == "PLAIN":
            self.sendLine(b"AUTHENTICATE +")
        elif cmd == "AUTHENTICATE":
            good = base64.b64encode(b"bot\0bot\0s3cret").decode()
            if rest == good:
                self.sendLine(b":irc.test 900 bot bot!bot@h bot :You are now logged in")
                self.sendLine(b":irc.test 903 bot :SASL authentication successful")
            else:
                self.sendLine(b":irc.test 904 bot :SASL authentication failed")
        elif cmd == "NICK":
            self.nick = rest
        elif cmd == "CAP" and rest == "END":
            self.ended = True
            self.sendLine(f":irc.test 001 {self.nick} :Welcome".encode())
        elif cmd == "JOIN":
            self.sendLine(f":{self.nick}!u@h JOIN {rest}".encode())


class SaslTests(TestCase):
    @inline
    async def test_sasl_plain_logs_in_before_registering_and_a_refusal_is_permanent(
        self,
    ) -> None:
        log: list[str] = []
        port = reactor.listenTCP(
            0, Factory.forProtocol(lambda: SaslServer(log)), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        network = IrcNetwork(reactor, AddressPolicy(["127.0.0.0/8"]), rate=50, burst=10)
        network.startService()
        self.addCleanup(network.stopService)
        good = IrcDestination(
            f"irc://bot:s3cret@127.0.0.1:{number}/#ops?auth=sasl", network=network
        )
        assert isinstance(await good.deliver(None, b"hello", "d1"), Delivered)  # type: ignore[arg-type]
        commands = [line.split(" ")[0] for line in log]
        # CAP REQ first, AUTHENTICATE before CAP END, and the password never as PASS.
        assert commands[0] == "CAP" and "PASS" not in commands
        assert commands.index("AUTHENTICATE") < log.index("CAP END")
        await until(lambda: log[-1] == "PRIVMSG #ops :hello")
        bad = IrcDestination(f"irc://bot2:wrong@127.0.0.1:{number}/#ops?auth=sasl", network=network)
        result: Any = await bad.deliver(None, b"hello", "d2")  # type: ignore[arg-type]
        assert isinstance(result, PermFail) and "SASL authentication failed" in result.reason


def test_sasl_needs_a_password() -> None:
    import pytest

    with pytest.raises(ValueError, match="needs a password"):
        parse_irc_url("irc://bot@irc.example.org/#x?auth=sasl")
