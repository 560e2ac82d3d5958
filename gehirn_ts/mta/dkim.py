"""DKIM verification (RFC 6376) with dkimpy, in a thread, against the configured resolver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dkim
import dns.exception
import dns.resolver


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass | fail | temperror | none
    domain: str
    selector: str

    def as_dict(self) -> dict[str, str]:
        return {"result": self.result, "domain": self.domain, "selector": self.selector}


class _Temporary(Exception):
    pass


def verify(message: bytes, resolver: dns.resolver.Resolver) -> list[DkimResult]:
    """One result per DKIM-Signature header (blocking: call in a thread)."""

    def txt(name: Any, timeout: float = 5) -> bytes:
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname, "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise _Temporary(str(e))
        return b"".join(b"".join(r.strings) for r in answer)

    try:
        checker = dkim.DKIM(message)
    except dkim.MessageFormatError:
        return []
    count = sum(1 for name, _ in checker.headers if name.lower() == b"dkim-signature")
    results = []
    for idx in range(count):
        try:
            ok = checker.verify(idx=idx, dnsfunc=txt)
            outcome = "pass" if ok else "fail"
        except _Temporary:
            outcome = "temperror"
        except dkim.DKIMException:
            outcome = "fail"
        domain = (checker.domain or b"").decode("ascii", "replace")
        selector = (checker.selector or b"").decode("ascii", "replace")
        results.append(DkimResult(outcome, domain, selector))
    return results
