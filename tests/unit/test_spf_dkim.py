"""SPF and DKIM verdicts against a real DNS server on loopback (twisted.names)."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from gehirn_ts.dnsresolver import make_async_resolver
from gehirn_ts.mta.dkim import DkimResult, _compress_whitespace, verify
from gehirn_ts.mta.headers import _authentication_results, authentication_results
from gehirn_ts.mta.spf import VERDICT_SECONDS, SpfChecker, SpfResult
from gehirn_ts.stamps import date_text
from gehirn_ts.threaddns import ThreadDNS
from tests.dnstest import dns_server
from tests.support import inline


def _zone() -> Any:
    server = dns_server()
    server.set("pass.example", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    server.set("fail.example", "TXT", "v=spf1 -all")
    server.set("soft.example", "TXT", "v=spf1 ~all")
    server.set("neutral.example", "TXT", "v=spf1 ?all")
    server.set("helo.example", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    server.set("nospf.example", "A", "192.0.2.99")
    # pyspf's mechanisms that look up other types: a, mx and a CNAME'd include.
    server.set("mech.example", "TXT", "v=spf1 a mx include:alias.example -all")
    server.set("mech.example", "A", "192.0.2.20")
    server.set("mech.example", "MX", [10, "mx1.mech.example"])
    server.set("mx1.mech.example", "A", "192.0.2.21")
    server.set("mx1.mech.example", "AAAA", "2001:db8::21")
    server.set("alias.example", "CNAME", "real.example")
    server.set("real.example", "TXT", "v=spf1 ip4:192.0.2.22 -all")
    return server


def _dns(port: int, timeout: float = 2.0) -> ThreadDNS:
    return ThreadDNS(make_async_resolver(["127.0.0.1"], port, timeout, reactor), reactor, timeout)


class _Threads:
    """Runs each job in a thread of its own (a ThreadRunner), counting them."""

    def __init__(self) -> None:
        self.jobs = 0

    def run(self, fn, *args):  # type: ignore[no-untyped-def]
        self.jobs += 1
        return deferToThread(fn, *args)


class SpfAndDkimAgainstTheServer(TestCase):
    """pyspf and dkimpy in threads, their lookups answered by twisted.names on the
    running reactor (`ThreadDNS`)."""

    def setUp(self) -> None:
        self.zone = _zone()
        self.resolver = _dns(self.zone.port)

    async def _spf(
        self, sender: str, helo: str = "client.test", ip: str = "192.0.2.10"
    ) -> SpfResult:
        checker = SpfChecker(self.resolver, "mx.test", Clock())
        return await deferToThread(checker._check, ip, sender, helo)

    @inline
    async def test_spf_results(self) -> None:
        for sender, expected in [
            ("a@pass.example", "pass"),
            ("a@fail.example", "fail"),
            ("a@soft.example", "softfail"),
            ("a@neutral.example", "neutral"),
            ("a@nospf.example", "none"),
            ("a@nxdomain.example", "none"),
        ]:
            result = await self._spf(sender)
            assert result.result == expected, (sender, result)
            assert result.identity == "mailfrom" and result.domain == sender.split("@")[1]
            assert result.header.lower().startswith(expected)

    @inline
    async def test_spf_mechanisms_that_look_up_a_mx_and_a_cname(self) -> None:
        # a (the domain's A), mx (the MX host's addresses), include: through a CNAME.
        for ip, expected in [
            ("192.0.2.20", "pass"),
            ("192.0.2.21", "pass"),
            ("2001:db8::21", "pass"),
            ("192.0.2.22", "pass"),
            ("192.0.2.23", "fail"),
        ]:
            result = await self._spf("a@mech.example", ip=ip)
            assert result.result == expected, (ip, result)

    @inline
    async def test_null_sender_checks_the_helo_identity(self) -> None:
        result = await self._spf("", helo="helo.example")
        assert (result.result, result.identity, result.domain) == ("pass", "helo", "helo.example")

    @inline
    async def test_spf_against_an_unreachable_server_is_a_temperror(self) -> None:
        self.resolver = _dns(9, 0.5)
        result = await self._spf("a@pass.example", helo="h.test")
        assert result.result == "temperror"

    @inline
    async def test_a_verdict_is_kept_a_minute_and_a_temperror_not(self) -> None:
        clock, threads = Clock(), _Threads()
        checker = SpfChecker(self.resolver, "mx.test", clock, threads)  # type: ignore[arg-type]

        async def verdict(c: SpfChecker, ip: str, sender: str, helo: str) -> str:
            return (await c.check(ip, sender, helo)).result

        for _ in range(3):
            assert await verdict(checker, "192.0.2.10", "a@pass.example", "h.test") == "pass"
        assert threads.jobs == 1
        # Another client, sender or HELO is another check.
        assert await verdict(checker, "192.0.2.11", "a@pass.example", "h.test") == "fail"
        assert await verdict(checker, "192.0.2.10", "b@pass.example", "h.test") == "pass"
        assert await verdict(checker, "192.0.2.10", "a@pass.example", "h2.test") == "pass"
        assert threads.jobs == 4
        clock.advance(VERDICT_SECONDS)
        assert await verdict(checker, "192.0.2.10", "a@pass.example", "h.test") == "pass"
        assert threads.jobs == 5
        dead = SpfChecker(_dns(9, 0.2), "mx.test", clock, threads)  # type: ignore[arg-type]
        for _ in range(2):
            assert await verdict(dead, "192.0.2.10", "a@pass.example", "h.test") == "temperror"
        assert threads.jobs == 7

    @inline
    async def test_dkim_pass_fail_and_none(self) -> None:
        private = _key(self.zone, "signed.example", "s1")
        signature = dkim.sign(
            MESSAGE,
            b"s1",
            b"signed.example",
            private,
            include_headers=[b"from", b"to", b"subject", b"message-id"],
        )
        signed = signature + MESSAGE
        (result,) = await deferToThread(verify, signed, self.resolver)
        assert (result.result, result.domain, result.selector) == ("pass", "signed.example", "s1")
        tampered = signed.replace(b"Hello", b"Jello")
        assert [r.result for r in await deferToThread(verify, tampered, self.resolver)] == ["fail"]
        assert await deferToThread(verify, MESSAGE, self.resolver) == []

    @inline
    async def test_dkim_key_missing_is_a_failure_and_no_answer_a_temperror(self) -> None:
        private = _key(self.zone, "gone.example", "s9")
        signed = dkim.sign(MESSAGE, b"s9", b"gone.example", private) + MESSAGE
        self.zone.zone.pop("s9._domainkey.gone.example")
        self.zone.write()
        assert [r.result for r in await deferToThread(verify, signed, self.resolver)] == ["fail"]
        dead = _dns(9, 0.2)
        assert [r.result for r in await deferToThread(verify, signed, dead)] == ["temperror"]

    @inline
    async def test_authentication_results_header(self) -> None:
        spf = await self._spf("a@pass.example", helo="h.test")
        header = authentication_results("mx.test", spf, [])
        assert header == (
            b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=pass.example; dkim=none\r\n"
        )

    @inline
    async def test_a_name_idna_cannot_write_is_no_record_not_an_error(self) -> None:
        # An SPF record may name anything; a label over 63 octets or an empty one
        # cannot be asked (RFC 1035 section 2.3.4), so it has no records.
        for name in ("x" * 70 + ".example", "a..example"):
            assert await deferToThread(self.resolver.records, name, "TXT") == []
        assert await deferToThread(self.resolver.txt, "pass.example") == [
            b"v=spf1 ip4:192.0.2.10 -all"
        ]

    def test_a_lookup_on_the_reactor_thread_raises_rather_than_waiting_for_ever(self) -> None:
        with pytest.raises(RuntimeError, match="reactor thread"):
            self.resolver.txt("pass.example")


def _key(dns: Any, domain: str, selector: str) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    dns.set(
        f"{selector}._domainkey.{domain}",
        "TXT",
        "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode(),
    )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


MESSAGE = (
    b"From: a@signed.example\r\nTo: u@mx.test\r\nSubject: signed\r\n"
    b"Message-ID: <1@signed.example>\r\n\r\nHello, signed world.\r\n"
)


def test_unsigned_mail_skips_dkimpy_and_any_signature_field_reaches_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[bytes] = []

    class Recorder:
        def __init__(self, message: bytes) -> None:
            parsed.append(message)
            self.headers: list[tuple[bytes, bytes]] = []

    monkeypatch.setattr(dkim, "DKIM", Recorder)
    resolver = ThreadDNS(None, None, 1)  # never asked: no signature is checked here
    unsigned = b"From: a@x.test\r\nSubject: DKIM-Signature: no\r\n\r\nDKIM-Signature: body\r\n"
    assert verify(unsigned, resolver) == [] and parsed == []
    for field in (b"DKIM-Signature: v=1", b"dkim-signature\t: v=1"):
        verify(b"From: a@x.test\r\n" + field + b"\r\n\r\nbody\r\n", resolver)
    assert len(parsed) == 2


class _Upstream:
    def __init__(self) -> None:
        self.asked: list[bytes] = []
        self.ttl = 60
        self.fail = False
        self.soa: tuple[int, int] | None = None  # (its TTL, its MINIMUM); TTL 0: no SOA

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object) -> object:
        from twisted.internet.defer import fail, succeed
        from twisted.names import dns as tdns
        from twisted.names.error import DNSNameError

        self.asked.append(name)
        if self.fail:
            return fail(DNSNameError(name))
        if self.soa is not None:  # an empty answer, with the zone's SOA or without
            soa = tdns.RRHeader(
                b"example", tdns.SOA, ttl=self.soa[0], payload=tdns.Record_SOA(minimum=self.soa[1])
            )
            return succeed(([], [soa] if self.soa[0] else [], []))
        record = tdns.RRHeader(name, tdns.A, ttl=self.ttl, payload=tdns.Record_A("192.0.2.1"))
        return succeed(([record], [], []))


def test_async_answers_are_kept_for_their_ttl_and_errors_are_not() -> None:
    from twisted.internet.task import Clock

    from gehirn_ts.dnsresolver import CachingResolver

    clock, upstream = Clock(), _Upstream()
    resolver = CachingResolver(upstream, clock, size=2)
    results: list[object] = []
    for _ in range(3):
        resolver.lookupAddress("mx.example").addBoth(results.append)
    assert upstream.asked == [b"mx.example"] and len(results) == 3
    clock.advance(59)
    resolver.lookupAddress("MX.example").addBoth(results.append)  # names are caseless
    assert upstream.asked == [b"mx.example"]
    clock.advance(1)
    resolver.lookupAddress("mx.example").addBoth(results.append)
    assert upstream.asked == [b"mx.example"] * 2  # the TTL ran out
    upstream.ttl = 0
    for _ in range(2):
        resolver.lookupAddress("zero.example").addBoth(results.append)
    assert upstream.asked.count(b"zero.example") == 2  # TTL 0: never kept
    upstream.fail = True
    for _ in range(2):
        resolver.lookupAddress("gone.example").addBoth(lambda _: None)
    assert upstream.asked.count(b"gone.example") == 2  # errors are not kept
    upstream.fail, upstream.ttl = False, 60
    for name in ("a.example", "b.example", "c.example"):
        resolver.lookupAddress(name).addBoth(results.append)
    assert len(resolver._entries) <= 2  # the size bound holds


def test_an_empty_answer_is_kept_by_its_soa_and_not_without_one() -> None:
    from twisted.internet.task import Clock

    from gehirn_ts.dnsresolver import CachingResolver

    clock, upstream = Clock(), _Upstream()
    resolver = CachingResolver(upstream, clock)
    # RFC 2308 section 5: the smaller of the SOA's TTL and its MINIMUM.
    upstream.soa = (300, 30)
    for _ in range(2):
        resolver.lookupIPV6Address("mx.example").addBoth(lambda _: None)
    assert upstream.asked == [b"mx.example"]
    clock.advance(29)
    resolver.lookupIPV6Address("mx.example").addBoth(lambda _: None)
    assert upstream.asked == [b"mx.example"]
    clock.advance(1)
    resolver.lookupIPV6Address("mx.example").addBoth(lambda _: None)
    assert upstream.asked == [b"mx.example"] * 2
    upstream.soa = (20, 3600)  # the SOA's own TTL is the smaller
    resolver.lookupIPV6Address("b.example").addBoth(lambda _: None)
    clock.advance(19)
    resolver.lookupIPV6Address("b.example").addBoth(lambda _: None)
    assert upstream.asked.count(b"b.example") == 1
    clock.advance(1)
    resolver.lookupIPV6Address("b.example").addBoth(lambda _: None)
    assert upstream.asked.count(b"b.example") == 2
    upstream.soa = (0, 0)  # no SOA: nothing says how long, so never kept
    for _ in range(2):
        resolver.lookupIPV6Address("c.example").addBoth(lambda _: None)
    assert upstream.asked.count(b"c.example") == 2


@given(
    st.lists(st.sampled_from([b"a", b" ", b"\t", b"  ", b"\r\n", b"\xff", b"x y"])).map(b"".join)
)
def test_whitespace_compression_is_the_same_as_dkimpys(content: bytes) -> None:
    # dkimpy's own step (canonicalization.compress_whitespace) rewrites every run.
    assert _compress_whitespace(content) == re.sub(b"[\t ]+", b" ", content)
    assert dkim.canonicalization.compress_whitespace is _compress_whitespace


@given(st.lists(st.floats(min_value=0, max_value=4e9), min_size=1, max_size=8))
@example([0.9999996, 0.9999994, 3999999999.9999995])
def test_the_received_date_is_what_formatdate_writes(times: list[float]) -> None:
    # Times asked in any order, some within one second of each other: the text kept
    # for a second is only used for that second.
    for t in [*times, *(x + 0.5 for x in times), *times]:
        assert date_text(t) == formatdate(t, usegmt=True)
        # A Date field's form, kept beside the other.
        assert date_text(t, gmt=False) == format_datetime(datetime.fromtimestamp(t, UTC))


def test_authentication_results_are_made_once_for_the_same_verdicts() -> None:
    spf = SpfResult("pass", "", "mailfrom", "example.org", "")
    first = authentication_results("mx.test", spf, [])
    hits = _authentication_results.cache_info().hits
    assert authentication_results("mx.test", spf, []) == first
    assert _authentication_results.cache_info().hits == hits + 1
    signed = authentication_results("mx.test", spf, [DkimResult("pass", "example.org", "s1")])
    assert signed != first and b"header.d=example.org" in signed
