"""SPF (RFC 7208) with pyspf, in a thread, against the daemon's resolver.

pyspf looks names up through its module-level ``DNSLookup``; it is replaced here, once,
by one that asks twisted.names through `ThreadDNS` (the same return shape as pyspf's
dnspython driver).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from gehirn_ts.mta.libs import spf
from gehirn_ts.recent import Recent
from gehirn_ts.threaddns import DnsTemporary, ThreadDNS
from gehirn_ts.threads import REACTOR_THREADS, ThreadRunner

_dns: ThreadDNS | None = None


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
    assert _dns is not None
    try:
        return _answer(name, qtype, _dns.records(name, qtype))
    except DnsTemporary as e:
        raise spf.TempError(f"DNS {e}") from None


def _answer(name: str, qtype: str, records: list[Any]) -> list[Any]:
    """Records in the shape pyspf's own dnspython driver returns (``DNSLookup``)."""
    out: list[Any] = []
    for r in records:
        if qtype == "A":
            out.append(((name, qtype), r.dottedQuad()))
        elif qtype == "AAAA":
            out.append(((name, qtype), str(ipaddress.IPv6Address(r.address))))
        elif qtype == "MX":
            out.append(((name, qtype), (r.preference, str(r.name))))
        elif qtype == "PTR":
            out.append(((name, qtype), str(r.name)))
        else:  # TXT, SPF
            out.append(((name, qtype), list(r.data)))
    return out


@dataclass(frozen=True)
class SpfResult:
    result: str  # pass fail softfail neutral none temperror permerror
    explanation: str
    identity: str  # mailfrom | helo
    domain: str
    header: str  # the Received-SPF field, without the name

    def as_dict(self) -> dict[str, str]:
        return {
            "result": self.result,
            "identity": self.identity,
            "domain": self.domain,
            "explanation": self.explanation,
        }


# How long a verdict is kept for the same client IP, MAIL FROM and HELO: the same
# inputs, and DNS answers that rarely change within it (SPF records' TTLs are minutes
# to hours). It saves pyspf's evaluation and a thread round trip: a client sending one
# message after another (a list, a notifier) is checked once a minute.
VERDICT_SECONDS = 60.0


class SpfChecker:
    def __init__(
        self,
        resolver: ThreadDNS,
        receiver: str,
        clock: IReactorTime,
        threads: ThreadRunner = REACTOR_THREADS,
    ) -> None:
        self._threads = threads
        global _dns
        _dns = resolver
        spf.DNSLookup = _lookup
        self._receiver = receiver
        self._verdicts = Recent(clock.seconds, seconds=VERDICT_SECONDS)

    def check(self, ip: str, sender: str, helo: str) -> Deferred[SpfResult]:
        # A DNS failure (temperror) is not kept: the next message asks again.
        return self._verdicts.lookup(
            (ip, sender, helo),
            lambda: self._threads.run(self._check, ip, sender, helo),
            keep_if=lambda verdict: verdict.result != "temperror",
        )

    def _check(self, ip: str, sender: str, helo: str) -> SpfResult:
        # RFC 7208 section 2.4: with the null reverse-path, the HELO identity is checked.
        q = spf.query(i=ip, s=sender, h=helo, receiver=self._receiver, timeout=20)
        result, _code, explanation = q.check()
        header = q.get_header(result, self._receiver)
        identity = "mailfrom" if sender else "helo"
        domain = sender.rpartition("@")[2] if sender else helo
        return SpfResult(
            result,
            explanation,
            identity,
            domain,
            header.partition(": ")[2] if header.startswith("Received-SPF") else header,
        )
