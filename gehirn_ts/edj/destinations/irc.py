"""The IRC destination: one persistent bot per (server, nick), shared by every
subscription that names them.

URL: ``irc://nick[:password]@host[:port]/#channel[,#other][?notice=1&auth=sasl|nickserv]``
(``#`` may also be written ``%23``); ``ircs://`` is TLS, the certificate verified unless
``?verify=0``. The password is the server password (PASS); with ``auth=nickserv`` an
IDENTIFY to NickServ after registration; with ``auth=sasl`` SASL PLAIN during
registration (IRCv3 CAP + AUTHENTICATE), a refusal being a permanent failure.

The bot (twisted.words ``IRCClient``) answers PING, takes ``nick_`` when its nick is in
use, joins channels as deliveries need them, and reconnects with backoff
(``ClientService``). Lines leave through a token bucket (``rate`` lines a second, bursts
of ``burst``). Text is split into lines on its line breaks, then on UTF-8 boundaries so
that the line the server relays (with our prefix) fits in 512 bytes (RFC 2812 section
2.3); control characters are dropped, so no event text can end a line and inject a
command. A delivery is Delivered once its lines are written; if the connection drops
first it is a TempFail and the worker retries it after the reconnect.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from zope.interface import implementer

from gehirn_ts.edj.netguard import AddressPolicy, GuardedEndpoint
from gehirn_ts.events import Event
from gehirn_ts.interfaces import Delivered, IDestination, PermFail, Result, TempFail
from gehirn_ts.logs import Logger
from gehirn_ts.redact import MASK

if TYPE_CHECKING:
    from gehirn_ts.edj.destinations.irc_protocol import BotProtocol

log = Logger()

LINE_LIMIT = 512  # RFC 2812 section 2.3, CRLF included
# What the server puts before our text when it relays it: ":nick!user@host ". The host
# is at most 63 bytes; nick and user are sized generously.
PREFIX_ALLOWANCE = 1 + 30 + 1 + 10 + 1 + 63 + 1
_CHANNEL = re.compile(r"^[#&][^\x00\x07\r\n ,:?]{1,49}$")
_NICK = re.compile(r"^[A-Za-z\[\]\\`_^{|}][A-Za-z0-9\[\]\\`_^{|}-]{0,29}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class JoinRefused(Exception):
    pass


class AuthFailed(Exception):
    pass


@dataclass(frozen=True)
class IrcSettings:
    host: str
    port: int
    tls: bool
    verify: bool
    nick: str
    password: str | None
    auth: str  # pass | nickserv
    channels: tuple[str, ...]
    notice: bool

    @property
    def key(self) -> tuple[str, int, bool, str]:
        return (self.host.lower(), self.port, self.tls, self.nick.lower())


def parse_irc_url(url: str) -> IrcSettings:
    """The settings of an irc:// or ircs:// URL; ValueError naming what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("irc", "ircs"):
        raise ValueError("not an irc:// or ircs:// URL")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("the port is invalid")
    if not host:
        raise ValueError("irc://nick@host[:port]/#channel: the host is missing")
    nick = unquote(parts.username or "")
    if not _NICK.match(nick):
        raise ValueError("irc://NICK@host/#channel: a valid nick (letters first, max 30)")
    raw = unquote(parts.path.lstrip("/"))
    # "/#chan?notice=1": URL syntax puts the options inside the fragment; take them out.
    fragment, _, extra = parts.fragment.partition("?")
    query = "&".join(q for q in (parts.query, extra) if q)
    if fragment:
        raw += "#" + unquote(fragment)
    channels = []
    for name in (c.strip() for c in raw.split(",")):
        if not name:
            continue
        if name[0] not in "#&":
            name = "#" + name
        if not _CHANNEL.match(name):
            raise ValueError(f"{name!r} is not a channel name")
        channels.append(name)
    if not channels or len(channels) > 10:
        raise ValueError("1 to 10 channels: irc://nick@host/#channel[,#other]")
    options: dict[str, str] = {}
    for name, values in parse_qs(query, keep_blank_values=True).items():
        if name not in ("notice", "auth", "verify"):
            raise ValueError(f"unknown option {name!r} (notice, auth, verify)")
        options[name] = values[-1]
    auth = options.get("auth", "pass")
    if auth not in ("pass", "nickserv", "sasl"):
        raise ValueError("auth is sasl or nickserv (or absent: the password is the server's)")
    if auth == "sasl" and not parts.password:
        raise ValueError("auth=sasl needs a password: irc://nick:password@host/...")
    for flag in ("notice", "verify"):
        if options.get(flag, "1") not in ("0", "1"):
            raise ValueError(f"{flag} is 0 or 1")
    tls = parts.scheme == "ircs"
    return IrcSettings(
        host=host,
        port=port or (6697 if tls else 6667),
        tls=tls,
        verify=options.get("verify", "1") == "1",
        nick=nick,
        password=unquote(parts.password) if parts.password else None,
        auth=auth,
        channels=tuple(channels),
        notice=options.get("notice", "0") == "1",
    )


def split_text(text: str, budget: int) -> list[str]:
    """Lines of at most ``budget`` UTF-8 bytes, cut at spaces where possible and never
    inside a character; control characters removed."""
    out: list[str] = []
    for raw_line in text.splitlines():
        line = _CONTROL.sub("", raw_line).strip()
        while line:
            encoded = line.encode()
            if len(encoded) <= budget:
                out.append(line)
                break
            cut = budget
            while cut > 0 and (encoded[cut] & 0xC0) == 0x80:
                cut -= 1  # back to the start of a UTF-8 character
            head = encoded[:cut].decode()
            space = head.rfind(" ")
            if space > len(head) // 2:
                head = head[:space]
            out.append(head.rstrip())
            line = line[len(head) :].lstrip()
    return out


def budget_for(command: str, target: str) -> int:
    return LINE_LIMIT - 2 - PREFIX_ALLOWANCE - len(f"{command} {target} :".encode())


class IrcBot:
    """One connection to one server under one nick, kept up by a ClientService."""

    def __init__(
        self,
        settings: IrcSettings,
        *,
        reactor: Any,
        policy: AddressPolicy,
        rate: float,
        burst: int,
        connect_timeout: float = 30,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        self.settings = settings
        self._clock = reactor
        self._rate = rate
        self._burst = burst
        self._tokens = float(burst)
        self._refilled = reactor.seconds()
        self._queue: deque[tuple[bytes, Deferred[None]]] = deque()
        self._drain_call: Any = None
        self._proto: BotProtocol | None = None
        self._ready: list[Deferred[BotProtocol]] = []
        self._joined_channels: set[str] = set()
        self._join_waiters: dict[str, list[Deferred[None]]] = {}
        self.auth_error: str | None = None
        endpoint: Any = GuardedEndpoint(
            reactor, settings.host, settings.port, policy, connect_timeout
        )
        if settings.tls:
            creator = (
                optionsForClientTLS(settings.host)
                if settings.verify
                else CertificateOptions(verify=False)
            )
            endpoint = wrapClientTLS(creator, endpoint)
        from gehirn_ts.edj.destinations.irc_protocol import BotProtocol

        self.service = ClientService(
            endpoint,
            Factory.forProtocol(lambda: BotProtocol(self)),
            retryPolicy=backoffPolicy(initialDelay=initial_delay, maxDelay=max_delay),
            clock=reactor,
        )

    # --- connection state ---

    def _auth_failed(self, reason: str) -> None:
        """Wrong credentials: no reconnecting with them; waiting deliveries fail."""
        self.auth_error = reason
        log.warn(
            "IRC bot {nick}@{host}: {reason}",
            nick=self.settings.nick,
            host=self.settings.host,
            reason=reason,
        )
        self.service.stopService()
        waiters, self._ready = self._ready, []
        for d in waiters:
            d.errback(AuthFailed(reason))

    def _signed_on(self, proto: BotProtocol) -> None:
        self._proto = proto
        self._joined_channels.clear()
        log.info(
            "IRC bot {nick} connected to {host}:{port}",
            nick=proto.nickname,
            host=self.settings.host,
            port=self.settings.port,
        )
        waiters, self._ready = self._ready, []
        for d in waiters:
            d.callback(proto)

    def _lost(self, proto: BotProtocol) -> None:
        if self._proto is proto:
            self._proto = None
        self._joined_channels.clear()
        error = ConnectionLost("the IRC connection was lost")
        for waiters in self._join_waiters.values():
            for d in waiters:
                d.errback(error)
        self._join_waiters.clear()
        queued, self._queue = self._queue, deque()
        for _, d in queued:
            d.errback(error)

    def _joined(self, channel: str) -> None:
        key = channel.lower()
        self._joined_channels.add(key)
        for d in self._join_waiters.pop(key, []):
            d.callback(None)

    def _left(self, channel: str) -> None:
        self._joined_channels.discard(channel.lower())

    def _join_failed(self, channel: str, reason: str) -> None:
        for d in self._join_waiters.pop(channel.lower(), []):
            d.errback(JoinRefused(reason))

    # --- what deliveries use ---

    def ready(self, timeout: float) -> Deferred[BotProtocol]:
        if self._proto is not None:
            return defer.succeed(self._proto)
        d: Deferred[BotProtocol] = Deferred(lambda d: self._ready.remove(d))
        self._ready.append(d)
        return d.addTimeout(timeout, self._clock)

    def join(self, channel: str, timeout: float) -> Deferred[None]:
        key = channel.lower()
        if key in self._joined_channels:
            return defer.succeed(None)
        proto = self._proto
        if proto is None:
            return defer.fail(ConnectionLost("not connected"))
        waiters = self._join_waiters.setdefault(key, [])
        d: Deferred[None] = Deferred(lambda d: waiters.remove(d) if d in waiters else None)
        if not waiters:
            proto._write(f"JOIN {channel}")
        waiters.append(d)
        return d.addTimeout(timeout, self._clock)

    def send(self, line: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._queue.append((line.encode() + b"\r\n", d))
        self._drain()
        return d

    def _drain(self) -> None:
        self._drain_call = None
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        while self._queue and self._tokens >= 1:
            proto = self._proto
            if proto is None or proto.transport is None:
                return  # _lost fails the queue; a reconnect starts afresh
            data, d = self._queue.popleft()
            proto.transport.write(data)
            self._tokens -= 1
            d.callback(None)
        if self._queue and self._drain_call is None:
            wait = (1 - self._tokens) / self._rate
            self._drain_call = self._clock.callLater(wait, self._drain)

    def stop(self) -> Deferred[None]:
        if self._drain_call is not None and self._drain_call.active():
            self._drain_call.cancel()
        if self._proto is not None and self._proto.transport is not None:
            self._proto._write("QUIT :gehirn-ts stopping")
        d: Deferred[None] = self.service.stopService()
        return d


class IrcNetwork(Service):
    """Every bot of this daemon; they stop (QUIT) with it."""

    name = "irc"

    def __init__(
        self,
        reactor: Any,
        policy: AddressPolicy,
        *,
        rate: float = 1.0,
        burst: int = 4,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
    ) -> None:
        self._reactor = reactor
        self._policy = policy
        self._rate = rate
        self._burst = burst
        self._initial_delay = initial_delay
        self._max_delay = max_delay
        self.bots: dict[tuple[str, int, bool, str], IrcBot] = {}

    def bot(self, settings: IrcSettings) -> IrcBot:
        bot = self.bots.get(settings.key)
        if bot is not None and bot.auth_error is not None:
            bot = None  # credentials refused last time: try afresh (they may be fixed)
        if bot is None:
            bot = IrcBot(
                settings,
                reactor=self._reactor,
                policy=self._policy,
                rate=self._rate,
                burst=self._burst,
                initial_delay=self._initial_delay,
                max_delay=self._max_delay,
            )
            self.bots[settings.key] = bot
            bot.service.startService()
        return bot

    def stopService(self) -> Any:
        super().stopService()
        bots, self.bots = list(self.bots.values()), {}
        return defer.DeferredList([b.stop() for b in bots], consumeErrors=True)


@implementer(IDestination)
class IrcDestination:
    kind = "irc"

    def __init__(self, url: str, *, network: IrcNetwork, timeout: float = 10.0) -> None:
        self._settings = parse_irc_url(url)
        self._network = network
        self._timeout = timeout

    def redacted_url(self) -> str:
        s = self._settings
        secret = f":{MASK}" if s.password else ""
        return f"{'ircs' if s.tls else 'irc'}://{s.nick}{secret}@{s.host}:{s.port}/" + ",".join(
            s.channels
        )

    def deliver(self, event: Event, rendered: bytes, delivery_id: str) -> Deferred[Result]:
        return Deferred.fromCoroutine(self._deliver(rendered))

    async def _deliver(self, rendered: bytes) -> Result:
        s = self._settings
        if not self._network.running:
            return TempFail("the IRC bots are stopping")
        bot = self._network.bot(s)
        try:
            await bot.ready(self._timeout)
        except defer.TimeoutError:
            return TempFail(f"not connected to {s.host}:{s.port} yet")
        except AuthFailed as e:
            return PermFail(str(e))
        command = "NOTICE" if s.notice else "PRIVMSG"
        lines = []
        for channel in s.channels:
            try:
                await bot.join(channel, self._timeout)
            except JoinRefused as e:
                return PermFail(f"cannot join {channel}: {e}")
            except (defer.TimeoutError, ConnectionLost) as e:
                return TempFail(f"joining {channel}: {type(e).__name__}")
            for text in split_text(
                rendered.decode("utf-8", "replace"), budget_for(command, channel)
            ):
                lines.append(bot.send(f"{command} {channel} :{text}"))
        try:
            await defer.gatherResults(lines, consumeErrors=True)
        except defer.FirstError:
            return TempFail("the connection dropped before every line was sent")
        return Delivered(reason=f"{len(lines)} lines")
