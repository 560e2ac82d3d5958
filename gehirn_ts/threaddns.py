"""Blocking DNS lookups for code in worker threads (pyspf, dkimpy), answered by the
reactor's twisted.names resolver.

One DNS stack and one cache for the whole daemon: the MX lookups of deliveries and the
SPF and DKIM records of received mail go through the same `CachingResolver`, and the
process does not carry a second DNS library (dnspython, 3.8 MB of memory; see
docs/decisions.md, "Memory"). A lookup in a thread puts the query on the reactor and
waits for its answer; from the reactor thread itself it would wait for ever, so that
raises at once.
"""

from __future__ import annotations

import threading
from queue import Empty, SimpleQueue
from typing import Any

from twisted.internet.defer import Deferred
from twisted.names import dns
from twisted.names.error import DNSNameError
from twisted.python.failure import Failure

# pyspf's query types, and the resolver method for each (ResolverBase's names).
TYPES: dict[str, tuple[int, str]] = {
    "A": (dns.A, "lookupAddress"),
    "AAAA": (dns.AAAA, "lookupIPV6Address"),
    "MX": (dns.MX, "lookupMailExchange"),
    "PTR": (dns.PTR, "lookupPointer"),
    "TXT": (dns.TXT, "lookupText"),
    "SPF": (dns.SPF, "lookupSenderPolicy"),
}


class DnsTemporary(Exception):
    """No answer (a timeout, SERVFAIL, a refusal): worth asking again later."""


class ThreadDNS:
    """Made on the reactor thread (the daemon's wiring, a test's set-up)."""

    def __init__(self, resolver: Any, reactor: Any, timeout: float) -> None:
        self._reactor_thread = threading.get_ident()
        self._resolver = resolver
        self._reactor = reactor
        # The resolver gives up after its own timeout; the thread waits a little longer
        # so that the resolver's error, not this one, is what is normally seen.
        self._wait = timeout + 5.0

    def records(self, name: str, qtype: str) -> list[Any]:
        """The answer section's records of type ``qtype`` (CNAMEs followed by the
        server, as a recursive resolver answers); [] for NXDOMAIN or no such record."""
        if threading.get_ident() == self._reactor_thread:
            raise RuntimeError("ThreadDNS.records called on the reactor thread")
        rtype, method = TYPES[qtype]
        box: SimpleQueue[Any] = SimpleQueue()

        def start() -> None:
            try:
                d: Deferred[Any] = getattr(self._resolver, method)(name)
            except UnicodeError:
                # Not a name IDNA can write (a label too long, say): no such name.
                box.put(([], [], []))
                return
            except Exception:
                box.put(Failure())
                return
            d.addBoth(box.put)

        self._reactor.callFromThread(start)
        try:
            result = box.get(timeout=self._wait)
        except Empty:
            raise DnsTemporary(f"no answer for {name} {qtype}") from None
        if isinstance(result, Failure):
            if result.check(DNSNameError):
                return []
            why = result.getErrorMessage() or getattr(result.type, "__name__", "error")
            raise DnsTemporary(f"{name} {qtype}: {why}")
        answers = result[0]
        return [rr.payload for rr in answers if rr.type == rtype]

    def txt(self, name: str) -> list[bytes]:
        """Each TXT record's strings joined, as RFC 7208 section 3.3 and RFC 6376
        section 3.6.2.2 read a record."""
        return [b"".join(r.data) for r in self.records(name, "TXT")]
