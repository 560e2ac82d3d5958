"""SPF and DKIM verdicts against a real DNS server on loopback (twisted.names)."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from gehirn_ts.dnsresolver import make_resolver
from gehirn_ts.mta.dkim import _compress_whitespace, verify
from gehirn_ts.mta.headers import authentication_results
from gehirn_ts.mta.spf import VERDICT_SECONDS, SpfChecker, SpfResult
from gehirn_ts.stamps import date_text
from tests.dnstest import dns_server


@pytest.fixture(scope="module")
def dns():
    server = dns_server()
    server.set("pass.example", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    server.set("fail.example", "TXT", "v=spf1 -all")
    server.set("soft.example", "TXT", "v=spf1 ~all")
    server.set("neutral.example", "TXT", "v=spf1 ?all")
    server.set("helo.example", "TXT", "v=spf1 ip4:192.0.2.10 -all")
    server.set("nospf.example", "A", "192.0.2.99")
    return server


@pytest.fixture(scope="module")
def resolver(dns):
    return make_resolver(["127.0.0.1"], dns.port, 2.0)


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("a@pass.example", "pass"),
        ("a@fail.example", "fail"),
        ("a@soft.example", "softfail"),
        ("a@neutral.example", "neutral"),
        ("a@nospf.example", "none"),
        ("a@nxdomain.example", "none"),
    ],
)
def test_spf_results(resolver, sender, expected):
    result = SpfChecker(resolver, "mx.test", Clock())._check("192.0.2.10", sender, "client.test")
    assert result.result == expected
    assert result.identity == "mailfrom" and result.domain == sender.split("@")[1]
    assert result.header.lower().startswith(expected)


def test_null_sender_checks_the_helo_identity(resolver):
    result = SpfChecker(resolver, "mx.test", Clock())._check("192.0.2.10", "", "helo.example")
    assert (result.result, result.identity, result.domain) == ("pass", "helo", "helo.example")


def test_spf_against_an_unreachable_server_is_a_temperror():
    dead = make_resolver(["127.0.0.1"], 9, 0.5)
    result = SpfChecker(dead, "mx.test", Clock())._check("192.0.2.10", "a@pass.example", "h.test")
    assert result.result == "temperror"


class _CountingThreads:
    """Runs a job at once, counting them (a ThreadRunner)."""

    def __init__(self) -> None:
        self.jobs = 0

    def run(self, fn, *args):  # type: ignore[no-untyped-def]
        self.jobs += 1
        return succeed(fn(*args))


def _verdict(d: Deferred[SpfResult]) -> str:
    out: list[SpfResult] = []
    d.addCallback(out.append)
    return out[0].result


def test_a_verdict_is_kept_a_minute_and_a_temperror_not(resolver):
    clock, threads = Clock(), _CountingThreads()
    checker = SpfChecker(resolver, "mx.test", clock, threads)  # type: ignore[arg-type]
    for _ in range(3):
        assert _verdict(checker.check("192.0.2.10", "a@pass.example", "h.test")) == "pass"
    assert threads.jobs == 1
    # Another client, sender or HELO is another check.
    assert _verdict(checker.check("192.0.2.11", "a@pass.example", "h.test")) == "fail"
    assert _verdict(checker.check("192.0.2.10", "b@pass.example", "h.test")) == "pass"
    assert _verdict(checker.check("192.0.2.10", "a@pass.example", "h2.test")) == "pass"
    assert threads.jobs == 4
    clock.advance(VERDICT_SECONDS)
    assert _verdict(checker.check("192.0.2.10", "a@pass.example", "h.test")) == "pass"
    assert threads.jobs == 5
    dead = SpfChecker(make_resolver(["127.0.0.1"], 9, 0.2), "mx.test", clock, threads)  # type: ignore[arg-type]
    for _ in range(2):
        assert _verdict(dead.check("192.0.2.10", "a@pass.example", "h.test")) == "temperror"
    assert threads.jobs == 7


def _key(dns, domain: str, selector: str) -> bytes:
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


def test_dkim_pass_fail_and_none(dns, resolver):
    private = _key(dns, "signed.example", "s1")
    signature = dkim.sign(
        MESSAGE,
        b"s1",
        b"signed.example",
        private,
        include_headers=[b"from", b"to", b"subject", b"message-id"],
    )
    signed = signature + MESSAGE
    (result,) = verify(signed, resolver)
    assert (result.result, result.domain, result.selector) == ("pass", "signed.example", "s1")
    tampered = signed.replace(b"Hello", b"Jello")
    assert [r.result for r in verify(tampered, resolver)] == ["fail"]
    assert verify(MESSAGE, resolver) == []


def test_dkim_key_missing_is_a_failure(dns, resolver):
    private = _key(dns, "gone.example", "s9")
    signed = dkim.sign(MESSAGE, b"s9", b"gone.example", private) + MESSAGE
    dns.zone.pop("s9._domainkey.gone.example")
    dns.write()
    assert [r.result for r in verify(signed, resolver)] == ["fail"]


def test_authentication_results_header(resolver):
    spf = SpfChecker(resolver, "mx.test", Clock())._check("192.0.2.10", "a@pass.example", "h.test")
    header = authentication_results("mx.test", spf, [])
    assert header == (
        b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=pass.example; dkim=none\r\n"
    )


def test_answers_are_kept_for_their_ttl(dns):
    # A busy MX asks for the same SPF and DKIM records again and again: answers are
    # cached for their TTL (60 s in the test zone), as a local caching resolver would.
    resolver = make_resolver(["127.0.0.1"], dns.port, 2.0)
    dns.set("cached.example", "TXT", "v=spf1 -all")
    first = resolver.resolve("cached.example", "TXT")
    dns.set("cached.example", "TXT", "v=spf1 +all")
    again = resolver.resolve("cached.example", "TXT")
    assert [r.to_text() for r in again] == [r.to_text() for r in first]
    fresh = make_resolver(["127.0.0.1"], dns.port, 2.0).resolve("cached.example", "TXT")
    assert [r.to_text() for r in fresh] == ['"v=spf1 +all"']


def test_unsigned_mail_skips_dkimpy_and_any_signature_field_reaches_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parsed: list[bytes] = []

    class Recorder:
        def __init__(self, message: bytes) -> None:
            parsed.append(message)
            self.headers: list[tuple[bytes, bytes]] = []

    monkeypatch.setattr(dkim, "DKIM", Recorder)
    resolver = make_resolver(["127.0.0.1"], port=1, timeout=1)
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
