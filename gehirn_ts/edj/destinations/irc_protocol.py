"""The IRC client protocol of the IRC destination's bots (RFC 2812, IRCv3 SASL PLAIN).

Its own module, imported when the first bot is made: twisted.words' IRC client is half
a megabyte of a daemon that may never speak IRC (docs/performance.md).
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.words.protocols import irc

if TYPE_CHECKING:
    from gehirn_ts.edj.destinations.irc import IrcBot


class BotProtocol(irc.IRCClient):
    username = "gehirn"
    realname = "gehirn-ts event bot"  # type: ignore[assignment]
    lineRate = None  # the bot's own token bucket paces the lines

    def __init__(self, bot: IrcBot) -> None:
        self.bot = bot
        self.nickname = bot.settings.nick
        s = bot.settings
        self.password = s.password if s.auth == "pass" and s.password else None  # type: ignore[assignment]

    def register(self, nickname: str, hostname: str = "foo", servername: str = "bar") -> None:
        if self.bot.settings.auth == "sasl":
            # IRCv3: registration waits for CAP END, sent once SASL is done.
            self._write("CAP REQ :sasl")
        irc.IRCClient.register(self, nickname, hostname, servername)

    def irc_CAP(self, prefix: str, params: list[str]) -> None:
        if self.bot.settings.auth != "sasl" or len(params) < 3:
            return
        if params[1].upper() == "ACK" and "sasl" in params[2].lower().split():
            self._write("AUTHENTICATE PLAIN")
        elif params[1].upper() == "NAK":
            self._sasl_failed("the server does not offer SASL")

    def irc_AUTHENTICATE(self, prefix: str, params: list[str]) -> None:
        if params and params[0] == "+":
            s = self.bot.settings
            plain = f"{s.nick}\0{s.nick}\0{s.password or ''}".encode()
            self._write("AUTHENTICATE " + base64.b64encode(plain).decode())

    def irc_903(self, prefix: str, params: list[str]) -> None:  # RPL_SASLSUCCESS
        self._write("CAP END")

    def _sasl_refused(self, prefix: str, params: list[str]) -> None:
        self._sasl_failed(params[-1] if params else "refused")

    irc_902 = irc_904 = irc_905 = irc_906 = irc_908 = _sasl_refused

    def _sasl_failed(self, reason: str) -> None:
        self._write("CAP END")
        self._write("QUIT :authentication failed")
        self.bot._auth_failed(f"SASL authentication failed: {reason}")
        assert self.transport is not None
        self.transport.loseConnection()

    def signedOn(self) -> None:
        s = self.bot.settings
        if s.auth == "nickserv" and s.password:
            self._write(f"PRIVMSG NickServ :IDENTIFY {s.password}")
        self.bot._signed_on(self)

    def _write(self, line: str) -> None:
        assert self.transport is not None
        self.transport.write(line.encode() + b"\r\n")

    def joined(self, channel: str) -> None:
        self.bot._joined(channel)

    def _refused(self, prefix: str, params: list[str]) -> None:
        if len(params) >= 2:
            self.bot._join_failed(params[1], params[-1])

    irc_ERR_NOSUCHCHANNEL = _refused
    irc_ERR_BANNEDFROMCHAN = _refused
    irc_ERR_INVITEONLYCHAN = _refused
    irc_ERR_BADCHANNELKEY = _refused
    irc_ERR_CHANNELISFULL = _refused
    irc_ERR_TOOMANYCHANNELS = _refused

    def kickedFrom(self, channel: str, kicker: str, message: str) -> None:
        self.bot._left(channel)

    def connectionLost(self, reason: Failure = ConnectionLost) -> None:  # type: ignore[assignment]
        irc.IRCClient.connectionLost(self, reason)
        self.bot._lost(self)
