"""Outbound delivery: an ESMTP client and the MX (or smarthost) courier.

twisted.mail's ``ESMTPClient`` sends no MAIL or RCPT parameters (SIZE, BODY, RET, ENVID,
NOTIFY, ORCPT) and reports a transaction, not each recipient; so the client here is a
small LineReceiver driven by one ``async`` function, one Deferred per expected reply,
which also makes PIPELINING (RFC 2920) a matter of writing several commands before
awaiting their replies. Decision recorded in docs/decisions.md.

Routing (RFC 5321 section 5.1): the MX records in preference order (equal ones shuffled);
no MX record means the domain itself (implicit MX); a null MX (RFC 7505) fails at once;
NXDOMAIN fails at once; other DNS errors defer. At most ``max_hosts`` hosts are tried.
"""

from __future__ import annotations

import base64
import random
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import CertificateOptions
from twisted.names import dns
from twisted.names import error as dns_error
from twisted.protocols.basic import FileSender, LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from gehirn_ts.interfaces import ICourier, Parcel, ParcelRecipient, RcptOutcome
from gehirn_ts.logs import Logger
from gehirn_ts.mta.params import xtext_encode
from gehirn_ts.netaddr import parse_ip
from gehirn_ts.sendnow import no_delay, write_now

log = Logger()

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


@dataclass(frozen=True)
class ServerReply:
    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str:
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m and m.group(1) == str(self.code)[0]:
            return ".".join(m.groups())
        # RFC 3463 section 3.1: X.0.0 when nothing more is known.
        return f"{str(self.code)[0]}.0.0"

    def __str__(self) -> str:
        return f"{self.code} " + " ".join(line for line in self.lines if line)

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class SessionError(Exception):
    """The session with one host ended before per-recipient results: try the next host."""

    def __init__(self, text: str, status: str, permanent: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.status = status
        self.permanent = permanent


class ClientProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 64 * 1024

    def __init__(self) -> None:
        self._replies: deque[ServerReply | Failure] = deque()
        self._waiters: deque[Deferred[ServerReply]] = deque()
        self._lines: list[str] = []
        self.tls = False
        self.lost = False
        self._closed: list[Deferred[None]] = []

    def closed(self) -> Deferred[None]:
        """Fires once the connection is gone."""
        if self.lost:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        return d

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
            self._deliver(Failure(SessionError(f"bad reply {text[:80]!r}", "4.5.0")))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._lines.append(text[4:])
        if text[3:4] != "-":
            reply = ServerReply(int(text[:3]), tuple(self._lines))
            self._lines = []
            self._deliver(reply)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._deliver(Failure(SessionError("reply line too long", "4.5.0")))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _deliver(self, item: ServerReply | Failure) -> None:
        if self._waiters:
            d = self._waiters.popleft()
            if isinstance(item, Failure):
                d.errback(item)
            else:
                d.callback(item)
        else:
            self._replies.append(item)

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost = True
        while self._waiters:
            self._waiters.popleft().errback(Failure(SessionError("lost connection", "4.4.2")))
        while self._closed:
            self._closed.pop().callback(None)

    def expect(self) -> Deferred[ServerReply]:
        if self._replies:
            item = self._replies.popleft()
            return defer.fail(item) if isinstance(item, Failure) else defer.succeed(item)
        if self.lost:
            return defer.fail(SessionError("lost connection", "4.4.2"))
        d: Deferred[ServerReply] = Deferred()
        self._waiters.append(d)
        return d

    def command(self, line: bytes) -> Deferred[ServerReply]:
        self.sendLine(line)
        return self.expect()

    def sendLine(self, line: bytes) -> None:
        self.send_lines([line])

    def send_lines(self, lines: list[bytes]) -> None:
        """Commands in one write, sent at once (gehirn_ts/sendnow.py): a pipelined group
        (RFC 2920) as one segment, not one held back by Nagle behind the one before."""
        write_now(self.transport, b"".join(line + b"\r\n" for line in lines))


def _esmtp_extensions(reply: ServerReply) -> dict[str, str]:
    out = {}
    for line in reply.lines[1:]:
        word, _, rest = line.partition(" ")
        out[word.upper()] = rest.strip()
    return out


WHOLE_DATA = 256 * 1024  # messages up to this size are sent from memory, in one write


def _dot_stuffer() -> Any:
    """A FileSender transform: RFC 5321 section 4.5.2 transparency, across chunks."""
    state = {"at_line_start": True}

    def transform(chunk: bytes) -> bytes:
        if state["at_line_start"] and chunk.startswith(b"."):
            chunk = b"." + chunk
        chunk = chunk.replace(b"\n.", b"\n..")
        state["at_line_start"] = chunk.endswith(b"\n")
        return chunk

    return transform


@dataclass(frozen=True)
class Host:
    name: str
    port: int


@dataclass
class Settings:
    helo: str
    port: int = 25
    timeout: float = 300.0
    connect_timeout: float = 30.0
    max_hosts: int = 5
    smarthost: Host | None = None
    username: str = ""
    password: str = ""
    tls: CertificateOptions | None = field(default=None)
    # Connection reuse, as Postfix's connection cache: a session that ended its
    # transaction cleanly waits this long for the next message to the same host, and
    # carries at most this many messages (smtp_connection_cache_time_limit = 2s; a reuse
    # limit keeps one long session from pinning a host).
    reuse_idle: float = 2.0
    reuse_limit: int = 100
    reuse_per_host: int = 20


@dataclass
class _Kept:
    """A session between transactions, waiting for the next message to its host."""

    proto: ClientProtocol
    ext: dict[str, str]
    uses: int
    timer: Any = None


class RouteError(Exception):
    def __init__(self, reply: str, status: str, permanent: bool) -> None:
        super().__init__(reply)
        self.reply = reply
        self.status = status
        self.permanent = permanent


@implementer(ICourier)
class MxCourier:
    def __init__(self, reactor: Any, resolver: Any, settings: Settings) -> None:
        self._reactor = reactor
        self._resolver = resolver
        self._settings = settings
        if settings.tls is None:
            # Opportunistic TLS (RFC 3207 with no authentication, Postfix's "may"):
            # encrypt whenever offered; an unverified certificate is still better than
            # cleartext.
            settings.tls = CertificateOptions(verify=False)
        self._kept: dict[tuple[str, str, int], list[_Kept]] = {}
        self._ending: set[Deferred[None]] = set()
        self._closed = False

    def close(self) -> Deferred[None]:
        """QUIT the sessions kept for reuse, and wait for those already ending (at stop)."""
        self._closed = True
        for sessions in self._kept.values():
            for kept in sessions:
                self._finish(kept)
        self._kept.clear()
        return defer.DeferredList(list(self._ending), consumeErrors=True).addCallback(
            lambda _: None
        )

    def _finish(self, kept: _Kept) -> None:
        """End a session in the background; ``close`` waits for it."""
        d = Deferred.fromCoroutine(self._end(kept))
        self._ending.add(d)

        def done(result: Any) -> None:
            self._ending.discard(d)
            if isinstance(result, Failure):
                log.failure("ending an SMTP session failed", result)

        d.addBoth(done)

    async def _end(self, kept: _Kept) -> None:
        if kept.timer is not None and kept.timer.active():
            kept.timer.cancel()
        await self._quit(kept.proto)
        if not kept.proto.lost:
            kept.proto.transport.loseConnection()  # type: ignore[union-attr]
        # Done when the connection is: a stop leaves no session half-closed behind.
        try:
            await kept.proto.closed().addTimeout(5, self._reactor)
        except defer.TimeoutError:
            kept.proto.transport.abortConnection()  # type: ignore[union-attr]

    def deliver(self, parcel: Parcel) -> Deferred[list[RcptOutcome]]:
        return Deferred.fromCoroutine(self._deliver(parcel))

    async def _deliver(self, parcel: Parcel) -> list[RcptOutcome]:
        try:
            hosts = await self._route(parcel.domain)
        except RouteError as e:
            kind = "failed" if e.permanent else "deferred"
            return [RcptOutcome(r.n, kind, e.reply, e.status) for r in parcel.recipients]
        last = SessionError("no usable host", "4.4.1")
        tried = 0
        for host in hosts:
            for ip in await self._addresses(host.name):
                if tried >= self._settings.max_hosts:
                    break
                tried += 1
                try:
                    return await self._session(ip, host, parcel)
                except SessionError as e:
                    last = e
                    log.info(
                        "{qid}: {host}[{ip}]: {error}",
                        qid=parcel.queue_id,
                        host=host.name,
                        ip=ip,
                        error=e.text,
                    )
                except Exception as e:
                    last = SessionError(f"connect to {host.name}[{ip}]: {e}", "4.4.1")
                    log.info("{qid}: {error}", qid=parcel.queue_id, error=last.text)
        kind = "failed" if last.permanent else "deferred"
        return [RcptOutcome(r.n, kind, last.text, last.status) for r in parcel.recipients]

    async def _route(self, domain: str) -> list[Host]:
        s = self._settings
        if s.smarthost is not None:
            return [s.smarthost]
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            return [Host(literal, s.port)]
        try:
            answers, _, _ = await self._resolver.lookupMailExchange(domain)
        except dns_error.DNSNameError:
            raise RouteError(f"550 5.1.2 domain {domain} does not exist", "5.1.2", permanent=True)
        except Exception as e:
            raise RouteError(
                f"451 4.4.3 DNS lookup of MX for {domain} failed: {type(e).__name__}",
                "4.4.3",
                permanent=False,
            )
        mxs = [a.payload for a in answers if a.type == dns.MX]
        if not mxs:
            return [Host(domain, s.port)]  # RFC 5321 section 5.1: the implicit MX
        if len(mxs) == 1 and str(mxs[0].name) in ("", "."):
            # RFC 7505 section 3: a null MX; 556 5.1.10 is what the RFC suggests.
            raise RouteError(
                f"556 5.1.10 domain {domain} accepts no mail (null MX)", "5.1.10", True
            )
        by_pref: dict[int, list[str]] = {}
        for mx in mxs:
            if str(mx.name) not in ("", "."):
                by_pref.setdefault(mx.preference, []).append(str(mx.name))
        hosts: list[Host] = []
        for pref in sorted(by_pref):
            names = by_pref[pref]
            random.shuffle(names)  # RFC 5321 section 5.1: spread load over equal MXs
            hosts.extend(Host(n, s.port) for n in names)
        return hosts

    async def _addresses(self, name: str) -> list[str]:
        if parse_ip(name) is not None:
            return [name]
        out: list[str] = []
        for lookup, rtype in (
            (self._resolver.lookupAddress, dns.A),
            (self._resolver.lookupIPV6Address, dns.AAAA),
        ):
            try:
                answers, _, _ = await lookup(name)
            except Exception:  # noqa: S112 - one address family missing is normal
                continue
            out.extend(
                a.payload.dottedQuad() if rtype == dns.A else _v6(a.payload)
                for a in answers
                if a.type == rtype
            )
        return out

    async def _session(self, ip: str, host: Host, parcel: Parcel) -> list[RcptOutcome]:
        key = (host.name, ip, host.port)
        while (kept := self._take(key)) is not None:
            # RFC 5321 section 4.1.1.5: RSET starts the next transaction clean, and its
            # answer shows the session still works (as Postfix checks a cached one).
            try:
                reply = await self._timed(kept.proto.command(b"RSET"), "RSET")
            except Exception:
                reply = None  # a dead kept session: the next one, or a new one
            if reply is not None and reply.code == 250 and not kept.proto.lost:
                return await self._transaction(key, kept.proto, host, parcel, kept.ext, kept.uses)
            if not kept.proto.lost:
                kept.proto.transport.loseConnection()  # type: ignore[union-attr]
        s = self._settings
        endpoint_cls = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        endpoint = endpoint_cls(self._reactor, ip, host.port, timeout=s.connect_timeout)
        proto = ClientProtocol()
        await connectProtocol(endpoint, proto)
        # Commands go out whole and at once (send_lines): Nagle could only delay them.
        no_delay(proto.transport)
        try:
            ext = await self._open(proto, host)
        except BaseException:
            if not proto.lost:
                proto.transport.loseConnection()  # type: ignore[union-attr]
            raise
        return await self._transaction(key, proto, host, parcel, ext, 0)

    async def _transaction(
        self,
        key: tuple[str, str, int],
        proto: ClientProtocol,
        host: Host,
        parcel: Parcel,
        ext: dict[str, str],
        uses: int,
    ) -> list[RcptOutcome]:
        """One mail transaction; then the session is kept for the next message to the
        host, or ended with QUIT."""
        try:
            outcomes = await self._mail(proto, host, parcel, ext)
        except BaseException:
            if not proto.lost:
                proto.transport.loseConnection()  # type: ignore[union-attr]
            raise
        self._keep(key, _Kept(proto, ext, uses + 1))
        return outcomes

    def _take(self, key: tuple[str, str, int]) -> _Kept | None:
        sessions = self._kept.get(key)
        while sessions:
            kept = sessions.pop()
            if kept.timer is not None and kept.timer.active():
                kept.timer.cancel()
            if not kept.proto.lost:
                return kept
        self._kept.pop(key, None)
        return None

    def _keep(self, key: tuple[str, str, int], kept: _Kept) -> None:
        s = self._settings
        sessions = self._kept.setdefault(key, [])
        if (
            self._closed
            or kept.proto.lost
            or kept.uses >= s.reuse_limit
            or len(sessions) >= s.reuse_per_host
            or s.reuse_idle <= 0
        ):
            self._finish(kept)
            return

        def expire() -> None:
            if kept in sessions:
                sessions.remove(kept)
            self._finish(kept)

        kept.timer = self._reactor.callLater(s.reuse_idle, expire)
        sessions.append(kept)

    def _timed(self, d: Deferred[ServerReply], what: str) -> Deferred[ServerReply]:
        def timeout(result: Any, _t: float) -> Any:
            raise SessionError(f"timeout waiting for the reply to {what}", "4.4.2")

        return d.addTimeout(self._settings.timeout, self._reactor, onTimeoutCancel=timeout)

    async def _open(self, proto: ClientProtocol, host: Host) -> dict[str, str]:
        """Greeting, EHLO, STARTTLS and AUTH: the session's extensions."""
        s = self._settings
        remote = host.name
        greeting = await self._timed(proto.expect(), "the greeting")
        if greeting.code != 220:
            raise SessionError(
                f"host {remote} refused to talk to us: {greeting}",
                greeting.enhanced,
                greeting.permanent,
            )
        ext = await self._hello(proto, remote)
        if "STARTTLS" in ext and s.tls is not None:
            reply = await self._timed(proto.command(b"STARTTLS"), "STARTTLS")
            if reply.code == 220:
                proto.transport.startTLS(s.tls)  # type: ignore[union-attr]
                proto.tls = True
                ext = await self._hello(proto, remote)
        if s.username:
            if not proto.tls:
                raise SessionError(f"{remote} offers no STARTTLS; AUTH refused in clear", "4.7.0")
            token = base64.b64encode(f"\0{s.username}\0{s.password}".encode()).decode()
            reply = await self._timed(proto.command(f"AUTH PLAIN {token}".encode()), "AUTH")
            if reply.code != 235:
                # A credentials problem is the operator's to fix: retry, never bounce.
                raise SessionError(f"{remote} refused AUTH: {reply}", "4.7.0")
        return ext

    async def _mail(
        self, proto: ClientProtocol, host: Host, parcel: Parcel, ext: dict[str, str]
    ) -> list[RcptOutcome]:
        """MAIL, RCPT and DATA: an outcome per recipient (no QUIT: the caller ends or
        keeps the session)."""
        remote = host.name
        limit = ext.get("SIZE", "")
        if limit.isdigit() and 0 < int(limit) < parcel.size:
            text = f"552 5.3.4 message size {parcel.size} exceeds {remote}'s limit of {limit}"
            return [
                RcptOutcome(r.n, "failed", text, "5.3.4", remote, proto.tls)
                for r in parcel.recipients
            ]
        dsn = "DSN" in ext
        mail = f"MAIL FROM:<{parcel.sender}>"
        if "SIZE" in ext:
            mail += f" SIZE={parcel.size}"
        if parcel.body and "8BITMIME" in ext:
            mail += f" BODY={parcel.body}"
        if dsn and parcel.ret:
            mail += f" RET={parcel.ret}"
        if dsn and parcel.envid:
            mail += f" ENVID={xtext_encode(parcel.envid)}"
        commands = [mail.encode()] + [_rcpt_command(r, dsn) for r in parcel.recipients]
        if "PIPELINING" in ext:
            proto.send_lines(commands)
            replies = [await self._timed(proto.expect(), "MAIL/RCPT") for _ in commands]
        else:
            replies = []
            for line in commands:
                replies.append(await self._timed(proto.command(line), line.split(b":")[0].decode()))
                if len(replies) == 1 and not replies[0].positive:
                    break
        mail_reply = replies[0]
        if not mail_reply.positive:
            kind = "failed" if mail_reply.permanent else "deferred"
            return [
                RcptOutcome(r.n, kind, str(mail_reply), mail_reply.enhanced, remote, proto.tls)
                for r in parcel.recipients
            ]
        outcomes: dict[int, RcptOutcome] = {}
        accepted: list[ParcelRecipient] = []
        for rcpt, reply in zip(parcel.recipients, replies[1:], strict=True):
            if reply.positive:
                accepted.append(rcpt)
            else:
                kind = "failed" if reply.permanent else "deferred"
                outcomes[rcpt.n] = RcptOutcome(
                    rcpt.n, kind, str(reply), reply.enhanced, remote, proto.tls
                )
        if accepted:
            final = await self._data(proto, parcel, remote)
            for rcpt in accepted:
                if final.positive:
                    asked = [n.upper() for n in rcpt.notify or []]
                    kind = "relayed" if not dsn and "SUCCESS" in asked else "delivered"
                else:
                    kind = "failed" if final.permanent else "deferred"
                outcomes[rcpt.n] = RcptOutcome(
                    rcpt.n, kind, str(final), final.enhanced, remote, proto.tls
                )
        return [outcomes[r.n] for r in parcel.recipients]

    async def _hello(self, proto: ClientProtocol, remote: str) -> dict[str, str]:
        helo = self._settings.helo.encode()
        reply = await self._timed(proto.command(b"EHLO " + helo), "EHLO")
        if reply.positive:
            return _esmtp_extensions(reply)
        reply = await self._timed(proto.command(b"HELO " + helo), "HELO")
        if not reply.positive:
            raise SessionError(f"{remote} refused HELO: {reply}", reply.enhanced, reply.permanent)
        return {}

    async def _data(self, proto: ClientProtocol, parcel: Parcel, remote: str) -> ServerReply:
        reply = await self._timed(proto.command(b"DATA"), "DATA")
        if reply.code != 354:
            return reply
        if parcel.size <= WHOLE_DATA:
            # Read and sent in one piece, at once: FileSender takes a reactor turn per
            # chunk and one more to finish, each with its epoll calls.
            with open(parcel.path, "rb") as f:
                text = _dot_stuffer()(f.read())
            tail = b"" if text[-1:] == b"\n" else b"\r\n"  # end the last line if open
            write_now(proto.transport, text + tail + b".\r\n")
            return await self._timed(proto.expect(), "the end of DATA")
        with Path(parcel.path).open("rb") as f:
            transform = _dot_stuffer()
            last = await FileSender().beginFileTransfer(f, proto.transport, transform)
        # FileSender fires with the last byte sent: end the last line if it is open.
        tail = b"" if last == b"\n" else b"\r\n"
        proto.transport.write(tail + b".\r\n")  # type: ignore[union-attr]
        return await self._timed(proto.expect(), "the end of DATA")

    async def _quit(self, proto: ClientProtocol) -> None:
        if proto.lost:
            return
        try:
            await proto.command(b"QUIT").addTimeout(5, self._reactor)
        except Exception:  # noqa: S110 - the results are in; QUIT is a courtesy
            pass


def _rcpt_command(rcpt: ParcelRecipient, dsn: bool) -> bytes:
    line = f"RCPT TO:<{rcpt.address}>"
    if dsn and rcpt.notify:
        line += f" NOTIFY={','.join(rcpt.notify)}"
    if dsn and rcpt.orcpt:
        line += f" ORCPT={rcpt.orcpt[0]};{xtext_encode(rcpt.orcpt[1])}"
    return line.encode()


def _v6(payload: Any) -> str:
    import socket

    return socket.inet_ntop(socket.AF_INET6, payload.address)
