"""The ESMTP server protocol, driven byte by byte (StringTransport, task.Clock).

Each hardening test names the stock twisted.mail behaviour it would fail on.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from gehirn_ts.mta import replies
from gehirn_ts.mta.address import Mailbox
from gehirn_ts.mta.anvil import SharedLimits
from gehirn_ts.mta.esmtp import Esmtp, EsmtpFactory, Session, Settings
from gehirn_ts.mta.policy import LOCAL, RelayPolicy
from gehirn_ts.mta.replies import SmtpError
from gehirn_ts.mta.spool import Envelope, Spool
from tests.support import inline, until


class TLSStringTransport(StringTransport):
    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.tls_started = False
        self.nodelay = False
        self.writes: list[bytes] = []  # each write, as the socket would get it

    def startTLS(self, ctx: Any) -> None:
        self.tls_started = True
        self.writes.append(b"<TLS>")

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class FakePolicy:
    """Local domain: local.test. Credentials: user / secret -> account acme."""

    def __init__(self) -> None:
        self.held: list[Deferred[str]] = []
        self.hold = False

    def recipient(self, mailbox: Mailbox, session: Session) -> Any:
        if self.hold:
            d: Deferred[str] = Deferred()
            self.held.append(d)
            return d
        if mailbox.domain in ("local.test", ""):
            return defer.succeed(LOCAL)
        return defer.fail(SmtpError(replies.RELAY_DENIED))

    def check_sender(self, sender: Any, session: Session) -> Any:
        return defer.succeed(None)

    def authenticate(self, username: str, password: str) -> Any:
        return defer.succeed("acme" if (username, password) == ("user", "secret") else None)


class Harness:
    def __init__(
        self,
        testcase: unittest.TestCase,
        listener: str = "smtp",
        implicit_tls: bool = False,
        tls: Any = object(),
        **settings: Any,
    ) -> None:
        self.spool = Spool(Path(testcase.mktemp()))
        self.clock = task.Clock()
        self.accepted: list[Envelope] = []
        self.policy = FakePolicy()
        self.factory = EsmtpFactory(
            settings=Settings(hostname="mx.test", **settings),
            listener=listener,
            policy=self.policy,
            spool=self.spool,
            accepted=lambda env, kinds: self.accepted.append(env),
            clock=self.clock,
            tls=tls,
            implicit_tls=implicit_tls,
        )

    def connect(self) -> tuple[Esmtp, TLSStringTransport]:
        transport = TLSStringTransport()
        proto = self.factory.buildProtocol(transport.getPeer())
        proto.makeConnection(transport)
        return proto, transport


def replies_of(transport: StringTransport) -> list[str]:
    return transport.value().decode("utf-8", "replace").split("\r\n")[:-1]


def codes(transport: StringTransport) -> list[str]:
    """Final reply lines (not the '250-' continuations)."""
    return [line for line in replies_of(transport) if re.match(r"^\d{3} ", line)]


def send(proto: Esmtp, *lines: bytes) -> None:
    proto.dataReceived(b"".join(line + b"\r\n" for line in lines))


MESSAGE = [b"Subject: hi", b"", b"hello", b"..dot-stuffed", b"."]


class ProtocolTests(unittest.TestCase):
    timeout = 30

    def test_greeting_and_ehlo_advertise_the_extensions(self) -> None:
        h = Harness(self, max_message_size=12345)
        proto, t = h.connect()
        send(proto, b"EHLO client.test")
        lines = replies_of(t)
        assert lines[0] == "220 mx.test ESMTP gehirn-ts"
        assert lines[1] == "250-mx.test Hello client.test"
        ext = [line[4:] for line in lines[2:]]
        assert ext == [
            "SIZE 12345",
            "8BITMIME",
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            "STARTTLS",
        ]
        # AUTH only once TLS is on.
        assert not any("AUTH" in line for line in lines)

    def test_helo_works_without_extensions_and_refuses_parameters(self) -> None:
        proto, t = Harness(self).connect()
        send(proto, b"HELO client.test", b"MAIL FROM:<a@b.test> SIZE=10", b"MAIL FROM:<a@b.test>")
        assert codes(t)[1:] == [
            "250 mx.test",
            "555 5.5.4 SIZE parameter not recognized",
            "250 2.1.0 Sender OK",
        ]

    @inline
    async def test_a_whole_transaction_is_spooled_before_the_250(self) -> None:
        h = Harness(self)
        proto, t = h.connect()
        send(
            proto,
            b"EHLO c.test",
            b"MAIL FROM:<a@remote.test> BODY=8BITMIME ENVID=e+2B1",
            b"RCPT TO:<u@local.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;u+40local.test",
            b"DATA",
            *MESSAGE,
        )
        await until(lambda: any(c.startswith("250 2.0.0 Ok: queued as") for c in codes(t)))
        qid = codes(t)[-1].rsplit(" ", 1)[1]
        # The 250 was sent after the message was committed with its envelope.
        assert [e.queue_id for e in h.spool.pending()] == [qid]
        raw = (h.spool.incoming / f"{qid}.eml").read_bytes()
        assert raw.startswith(b"Received: from c.test ([192.0.2.7])\r\n\tby mx.test")
        assert raw.endswith(b"Subject: hi\r\n\r\nhello\r\n.dot-stuffed\r\n")
        (env,) = h.accepted
        assert env.sender == "a@remote.test" and env.envid == "e+1" and env.body == "8BITMIME"
        assert env.recipients[0].notify == ["SUCCESS", "DELAY"]
        assert env.recipients[0].orcpt == ["rfc822", "u@local.test"]

    @inline
    async def test_a_disk_that_fails_at_the_end_of_data_gets_a_451_and_leaves_nothing(
        self,
    ) -> None:
        # The message's last block is written at the commit: a full disk there is a
        # temporary failure (RFC 3463 4.3.0), nothing of the message stays, and the
        # session goes on.
        import errno

        from gehirn_ts.mta import spool as spool_module

        def full(fd: int, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(spool_module, "write_all", full)
        h = Harness(self)
        proto, t = h.connect()
        send(proto, b"EHLO c.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<u@local.test>")
        send(proto, b"DATA", *MESSAGE)
        await until(lambda: "451 4.3.0 Local error in processing, try again later" in codes(t))
        assert list(h.spool.tmp.iterdir()) == [] and list(h.spool.incoming.iterdir()) == []
        assert h.accepted == []
        send(proto, b"NOOP")
        assert codes(t)[-1].startswith("250 ")
        assert len(self.flushLoggedErrors(OSError)) == 1

    def test_every_reply_after_ehlo_has_an_enhanced_code(self) -> None:
        proto, t = Harness(self).connect()
        send(proto, b"EHLO c.test")
        t.clear()
        send(
            proto,
            b"NOOP",
            b"RSET",
            b"VRFY x",
            b"BOGUS",
            b"MAIL FROM:<>",
            b"RCPT TO:<x@remote.test>",
            b"RCPT TO:<u@local.test>",
            b"MAIL FROM:<>",
            b"HELP",
            b"QUIT",
        )
        assert len(codes(t)) == 10
        for line in codes(t):
            assert re.match(r"^\d{3} [245]\.\d{1,3}\.\d{1,3} ", line), line

    def test_mail_before_helo_is_503(self) -> None:
        proto, t = Harness(self).connect()
        send(proto, b"MAIL FROM:<a@b.test>")
        assert codes(t)[-1] == "503 5.5.1 Send EHLO or HELO first"

    # --- the stock server's unsafe behaviours ---

    def test_starttls_discards_what_was_pipelined_in_clear(self) -> None:
        # Stock ESMTP.ext_STARTTLS keeps processing the lines of the same read.
        proto, t = Harness(self).connect()
        send(proto, b"EHLO c.test")
        t.clear()
        send(proto, b"STARTTLS", b"MAIL FROM:<evil@remote.test>", b"RCPT TO:<u@local.test>")
        assert t.tls_started
        assert replies_of(t) == ["220 2.0.0 Ready to start TLS"]
        # The session starts over: no HELO yet, nothing of the clear-text transaction.
        t.clear()
        send(proto, b"MAIL FROM:<a@b.test>")
        assert replies_of(t) == ["503 5.5.1 Send EHLO or HELO first"]
        send(proto, b"EHLO c.test")
        assert "250-AUTH PLAIN LOGIN" in replies_of(t) or "250 AUTH PLAIN LOGIN" in replies_of(t)

    @inline
    async def test_an_overlong_line_in_data_never_leaves_data_mode(self) -> None:
        # Stock SMTP.lineLengthExceeded goes back to command mode: the rest of the
        # message is then read as commands (smuggling).
        h = Harness(self, max_line=1000)
        proto, t = h.connect()
        send(
            proto, b"EHLO c.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<u@local.test>", b"DATA"
        )
        proto.dataReceived(b"x" * 5000 + b"\r\n")
        send(proto, b"MAIL FROM:<smuggled@remote.test>", b"RCPT TO:<v@local.test>", b".")
        await until(lambda: codes(t)[-1].startswith("500"))
        assert codes(t)[-1] == "500 5.5.6 Line too long"
        assert codes(t)[-2] == "354 End data with <CR><LF>.<CR><LF>"
        assert not any("smuggled" in line or "2.1.0" in line for line in codes(t)[4:])
        assert h.accepted == []
        assert list(h.spool.tmp.iterdir()) == []

    def test_an_overlong_command_is_refused_and_the_session_goes_on(self) -> None:
        proto, t = Harness(self, max_line=100).connect()
        proto.dataReceived(b"EHLO " + b"a" * 300)
        proto.dataReceived(b"a" * 300 + b"\r\nNOOP\r\n")
        assert codes(t)[1:] == ["500 5.5.6 Line too long", "250 2.0.0 OK"]
        assert len(proto._buffer) <= 100

    @inline
    async def test_pipelined_commands_are_answered_in_order_while_a_check_waits(self) -> None:
        # Stock SMTP answers NOOP before a RCPT whose validateTo is still pending.
        h = Harness(self)
        h.policy.hold = True
        proto, t = h.connect()
        send(proto, b"EHLO c.test", b"MAIL FROM:<a@remote.test>")
        t.clear()
        send(proto, b"RCPT TO:<u@local.test>", b"RCPT TO:<v@local.test>", b"NOOP")
        assert replies_of(t) == []  # the first RCPT's check is pending: nothing else yet
        assert t.producerState == "paused"
        h.policy.held[0].callback(LOCAL)
        assert replies_of(t) == ["250 2.1.5 Recipient OK"]
        h.policy.held[1].errback(SmtpError(replies.NO_SUCH_USER))
        assert replies_of(t) == [
            "250 2.1.5 Recipient OK",
            "550 5.1.1 No such user here",
            "250 2.0.0 OK",
        ]
        assert t.producerState == "producing"

    def test_the_replies_to_one_read_go_out_in_one_write(self) -> None:
        proto, t = Harness(self).connect()
        assert t.nodelay  # single writes, no Nagle wait for the one before's ACK
        assert t.writes == [b"220 mx.test ESMTP gehirn-ts\r\n"]
        # RFC 2920: a pipelined group is answered together, the EHLO lines in one piece.
        send(proto, b"EHLO c.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<u@local.test>")
        assert len(t.writes) == 2
        assert t.writes[1].startswith(b"250-mx.test Hello c.test\r\n")
        assert t.writes[1].endswith(b"250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n")
        # STARTTLS's 220 is written before TLS starts; what follows it is discarded.
        send(proto, b"RSET", b"STARTTLS", b"NOOP")
        assert t.writes[2:] == [b"250 2.0.0 Reset OK\r\n220 2.0.0 Ready to start TLS\r\n", b"<TLS>"]
        # QUIT's reply is written before the connection closes.
        send(proto, b"QUIT")
        assert t.writes[-1].startswith(b"221 ") and t.disconnecting

    @inline
    async def test_reading_stops_only_when_more_comes_while_a_check_waits(self) -> None:
        h = Harness(self)
        h.policy.hold = True
        proto, t = h.connect()
        send(proto, b"EHLO c.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<u@local.test>")
        assert t.producerState == "producing"  # one command waits, nothing more came
        send(proto, b"NOOP")
        assert t.producerState == "paused"
        h.policy.held[0].callback(LOCAL)
        assert replies_of(t)[-2:] == ["250 2.1.5 Recipient OK", "250 2.0.0 OK"]
        assert t.producerState == "producing"

    @inline
    async def test_size_is_enforced_while_streaming(self) -> None:
        h = Harness(self, max_message_size=2000, max_line=200)
        proto, t = h.connect()
        send(
            proto,
            b"EHLO c.test",
            b"MAIL FROM:<a@remote.test> SIZE=1999",
            b"RCPT TO:<u@local.test>",
            b"DATA",
        )
        for _ in range(100):  # 10 KB in 100-byte lines
            proto.dataReceived(b"y" * 98 + b"\r\n")
            assert len(proto._buffer) < 200
            tmp = list(h.spool.tmp.iterdir())
            assert all(p.stat().st_size <= 2000 for p in tmp)
        send(proto, b".")
        assert codes(t)[-1] == "552 5.3.4 Message size exceeds the fixed maximum"
        assert h.accepted == [] and list(h.spool.tmp.iterdir()) == []
        send(proto, b"MAIL FROM:<a@remote.test> SIZE=2001")
        assert codes(t)[-1] == "552 5.3.4 Message size exceeds the fixed maximum"

    @inline
    async def test_bare_lf_in_a_message_is_refused_and_never_ends_data(self) -> None:
        h = Harness(self)
        proto, t = h.connect()
        send(
            proto, b"EHLO c.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<u@local.test>", b"DATA"
        )
        proto.dataReceived(b"Subject: x\r\n\r\nline\n.\nMAIL FROM:<x@y.test>\r\n")
        assert codes(t)[-1].startswith("354")  # "\n.\n" ended nothing
        send(proto, b".")
        assert codes(t)[-1] == "554 5.6.0 Message contains a bare CR or LF (RFC 5321 2.3.8)"
        send(proto, b"NOOP\nNOOP")
        assert codes(t)[-1].startswith("500 5.5.2")
        assert h.accepted == []

    def test_idle_timeout(self) -> None:
        h = Harness(self, idle_timeout=60)
        _proto, t = h.connect()
        h.clock.advance(59)
        assert not t.disconnecting
        h.clock.advance(2)
        assert codes(t)[-1] == "421 4.4.2 Idle timeout, closing connection"
        assert t.disconnecting

    def test_connections_per_ip_are_capped(self) -> None:
        h = Harness(self, max_connections_per_ip=2)
        (p1, t1), (_p2, _t2), (_p3, t3) = h.connect(), h.connect(), h.connect()
        assert codes(t3) == ["421 4.7.0 Too many connections from your address, try later"]
        assert t3.disconnecting and not t1.disconnecting
        p1.connectionLost(None)
        _p4, t4 = h.connect()
        assert codes(t4)[0].startswith("220")

    def test_in_a_worker_the_limits_over_all_workers_apply_too(self) -> None:
        # mta/anvil.py: the worker reports its sessions and AUTH failures, and refuses
        # what the main process says is at a limit over all workers.
        h = Harness(self, listener="submissions", implicit_tls=True, max_connections_per_ip=5)
        reported: list[bytes] = []
        h.factory.shared = SharedLimits(h.clock.seconds)
        h.factory.report = reported.append
        p1, _t1 = h.connect()
        ip = p1.session.client_ip
        assert reported == [f"open submissions {ip}\n".encode()]
        send(p1, b"EHLO c.test", b"AUTH PLAIN " + base64.b64encode(b"\0user\0wrong"))
        assert reported[-1] == f"authfail submissions {ip}\n".encode()
        h.factory.shared.notice(f"full submissions {ip}".encode())
        _p2, t2 = h.connect()  # one session here, the rest in other workers
        assert codes(t2) == ["421 4.7.0 Too many connections from your address, try later"]
        assert len(reported) == 2  # a refused session is not counted
        h.factory.shared.notice(f"block submissions {ip} 60.000".encode())
        send(p1, b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret"))
        assert codes(_t1)[-1] == "454 4.7.0 Too many failed authentication attempts, try later"
        p1.connectionLost(None)
        assert reported[-1] == f"close submissions {ip}\n".encode()
        h.factory.shared.notice(f"room submissions {ip}".encode())
        h.clock.advance(61)
        p3, t3 = h.connect()
        send(p3, b"EHLO c.test", b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret"))
        assert codes(t3)[-1] == "235 2.7.0 Authentication succeeded"

    def test_too_many_recipients(self) -> None:
        proto, t = Harness(self, max_recipients=2).connect()
        send(
            proto,
            b"EHLO c.test",
            b"MAIL FROM:<>",
            b"RCPT TO:<a@local.test>",
            b"RCPT TO:<b@local.test>",
            b"RCPT TO:<c@local.test>",
        )
        assert codes(t)[-1] == "452 4.5.3 Too many recipients"

    # --- AUTH ---

    def test_auth_needs_tls(self) -> None:
        proto, t = Harness(self).connect()
        send(proto, b"EHLO c.test", b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret"))
        assert codes(t)[-1] == "538 5.7.11 Encryption required: use STARTTLS first"

    @inline
    async def test_auth_plain_and_login(self) -> None:
        h = Harness(self, listener="submissions", implicit_tls=True)
        proto, t = h.connect()
        send(proto, b"EHLO c.test", b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret"))
        assert codes(t)[-1] == "235 2.7.0 Authentication succeeded"
        assert proto.session.account == "acme"
        proto2, t2 = h.connect()
        send(proto2, b"EHLO c.test", b"AUTH LOGIN")
        assert replies_of(t2)[-1] == "334 " + base64.b64encode(b"Username:").decode()
        send(proto2, base64.b64encode(b"user"))
        assert replies_of(t2)[-1] == "334 " + base64.b64encode(b"Password:").decode()
        send(proto2, base64.b64encode(b"secret"))
        assert codes(t2)[-1] == "235 2.7.0 Authentication succeeded"

    def test_bad_and_malformed_auth_then_the_rate_limit(self) -> None:
        h = Harness(self, listener="submissions", implicit_tls=True, auth_failures=2)
        proto, t = h.connect()
        send(proto, b"EHLO c.test", b"AUTH PLAIN not-base64!", b"NOOP")
        assert codes(t)[-2:] == ["501 5.5.2 Cannot decode the AUTH response", "250 2.0.0 OK"]
        send(proto, b"AUTH PLAIN", b"*")
        assert codes(t)[-1] == "501 5.0.0 Authentication cancelled"
        for _ in range(2):
            send(proto, b"AUTH PLAIN " + base64.b64encode(b"\0user\0wrong"))
            assert codes(t)[-1] == "535 5.7.8 Authentication credentials invalid"
        send(proto, b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret"))
        assert codes(t)[-1] == "454 4.7.0 Too many failed authentication attempts, try later"
        h.clock.advance(601)  # the window has passed (and this session timed out)
        proto, t = h.connect()
        send(proto, b"EHLO c.test", b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret"))
        assert codes(t)[-1] == "235 2.7.0 Authentication succeeded"

    def test_submission_needs_tls_then_auth_before_mail(self) -> None:
        h = Harness(self, listener="submission")
        proto, t = h.connect()
        send(proto, b"EHLO c.test", b"MAIL FROM:<a@local.test>")
        assert codes(t)[-1] == "530 5.7.0 Must issue a STARTTLS command first"
        proto.session.tls = True
        send(proto, b"MAIL FROM:<a@local.test>")
        assert codes(t)[-1] == "530 5.7.0 Authentication required"


class RelayPolicyTests(unittest.TestCase):
    def policy(self, trusted: tuple[str, ...] = ()) -> RelayPolicy:
        async def owner(domain: str) -> str | None:
            return "acme" if domain == "local.test" else None

        async def auth(u: str, p: str) -> str | None:
            return None

        return RelayPolicy(owner, auth, trusted)

    async def verdict(self, policy: RelayPolicy, address: bytes, session: Session) -> str:
        from gehirn_ts.mta.address import parse_path

        mailbox, _ = parse_path(address, kind="recipient", allow_postmaster=True)
        assert mailbox is not None
        try:
            return await policy.recipient(mailbox, session)
        except SmtpError as e:
            return str(e.reply)

    @inline
    async def test_no_open_relay(self) -> None:
        p = self.policy(trusted=("10.0.0.0/8",))
        anon = Session("smtp", "198.51.100.9")
        legacy = Session("smtp", "10.1.2.3")
        authed = Session("submission", "198.51.100.9", account="acme")
        cases = {
            (b"<u@local.test>", "anon"): "local",
            (b"<u@LOCAL.TEST.>", "anon"): "local",
            (b"<postmaster>", "anon"): "local",
            (b"<u@remote.test>", "anon"): "554 5.7.1 Relay access denied",
            (b"<u@remote.test>", "legacy"): "relay",
            (b"<u@remote.test>", "authed"): "relay",
            (b"<u%remote.test@local.test>", "anon"): "554 5.7.1 Sender-specified routing "
            "is not allowed",
            (b"<remote.test!u@local.test>", "anon"): "554 5.7.1 Sender-specified routing "
            "is not allowed",
            (b'<"u@remote.test"@local.test>', "anon"): "554 5.7.1 Sender-specified routing "
            "is not allowed",
            (b"<@local.test:u@remote.test>", "anon"): "554 5.7.1 Sender-specified routing "
            "is not allowed",
            (b"<u%remote.test@local.test>", "legacy"): "local",
        }
        sessions = {"anon": anon, "legacy": legacy, "authed": authed}
        for (address, who), expected in cases.items():
            assert await self.verdict(p, address, sessions[who]) == expected, (address, who)

    @inline
    async def test_a_known_address_takes_one_store_read(self) -> None:
        from gehirn_ts.store.db import Route

        calls: list[str] = []

        async def owner(domain: str) -> str | None:
            calls.append("owner")
            return "acme" if domain == "local.test" else None

        async def auth(u: str, p: str) -> str | None:
            return None

        async def routes(address: str) -> tuple[str, Route | None] | None:
            calls.append("routes")
            if address == "u@local.test":
                return "acme", None
            if address == "no@local.test":
                return "acme", Route("r1", "acme", address, "reject", [], 0.0)
            return None

        p = RelayPolicy(owner, auth, ("10.0.0.0/8",), routes=routes)
        anon, legacy = Session("smtp", "198.51.100.9"), Session("smtp", "10.1.2.3")
        cases = [
            (b"<u@local.test>", anon, "local", ["routes"]),
            (b"<x@local.test>", anon, "550 5.1.1 No such user here", ["routes", "owner"]),
            (b"<no@local.test>", anon, "550 5.1.1 No such user here", ["routes"]),
            (b"<postmaster@local.test>", anon, "local", ["owner"]),
            (b"<u@remote.test>", anon, "554 5.7.1 Relay access denied", ["routes", "owner"]),
            (b"<u@remote.test>", legacy, "relay", ["routes", "owner"]),
        ]
        for address, session, expected, lookups in cases:
            calls.clear()
            assert await self.verdict(p, address, session) == expected, address
            assert calls == lookups, address


def _in_data(h: Harness, data: bytes, piece: int) -> tuple[Esmtp, Any]:
    """A session taken to DATA, then ``data`` sent in reads of ``piece`` bytes."""
    proto, t = h.connect()
    send(proto, b"EHLO c.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<u@local.test>", b"DATA")
    for i in range(0, len(data), piece):
        proto.dataReceived(data[i : i + piece])
    return proto, t


class BulkDataTests(unittest.TestCase):
    """Message text arriving in its own reads takes the block path; it must store exactly
    what the line-by-line path stores."""

    timeout = 30

    async def _stored(self, data: bytes, piece: int) -> bytes:
        """The body spooled for a transaction whose DATA (``data``, its end and a
        pipelined NOOP included) arrives in reads of ``piece`` bytes."""
        h = Harness(self)
        _, t = _in_data(h, data, piece)
        await until(lambda: codes(t)[-1:] == ["250 2.0.0 OK"])
        qid = codes(t)[-2].rsplit(" ", 1)[1]
        return (h.spool.incoming / f"{qid}.eml").read_bytes().split(b"\r\n\r\n", 1)[1]

    @inline
    async def test_block_and_line_paths_store_the_same_bytes(self) -> None:
        body = b"Subject: dots\r\n\r\n..two\r\n.one\r\nplain\r\n...three\r\n" + b"z" * 900 + b"\r\n"
        # Whole, and in pieces cut inside lines; then the end of data with a pipelined NOOP.
        stored = [await self._stored(body + b".\r\nNOOP\r\n", piece) for piece in (10_000, 7)]
        assert (
            stored[0] == stored[1] == b".two\r\none\r\nplain\r\n..three\r\n" + b"z" * 900 + b"\r\n"
        )

    @inline
    async def test_a_bare_cr_or_lf_anywhere_in_a_block_is_refused(self) -> None:
        lines = b"".join(b"%04d line of text\r\n" % n for n in range(300))
        for bare in (b"a\rb", b"a\nb", b"\r\r\n", b"\r\n\n", b"\n", b"\r"):
            data = b"Subject: b\r\n\r\n" + lines + bare + b"\r\n" + lines + b".\r\nNOOP\r\n"
            for piece in (len(data), 4096, 997):
                h = Harness(self)
                _, t = _in_data(h, data, piece)
                assert codes(t)[-2:] == [
                    "554 5.6.0 Message contains a bare CR or LF (RFC 5321 2.3.8)",
                    "250 2.0.0 OK",  # the NOOP after it: the session goes on
                ], (bare, piece)
                assert h.accepted == []

    @inline
    async def test_bodies_with_and_without_periods_in_any_reads(self) -> None:
        dotless = b"".join(
            b"%06dXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\r\n" % n for n in range(2000)
        )
        bodies = [
            dotless,  # no period at all (as base64): the memchr path
            dotless + b"..stuffed at the end\r\n",
            b"mid.line. periods only\r\n" + dotless,
            b"..first\r\n" + dotless + b".x\r\n",
        ]
        for body in bodies:
            expected = b"\r\n".join(
                line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n")
            )
            data = b"Subject: p\r\n\r\n" + body + b".\r\nNOOP\r\n"
            for piece in (len(data), 65536, 4096, 997):
                assert await self._stored(data, piece) == expected, (body[:20], piece)
