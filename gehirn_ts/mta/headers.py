"""Trace and result header fields the server adds (RFC 8601 via the authres library)."""

from __future__ import annotations

import functools

import authres

from gehirn_ts.mta.dkim import DkimResult
from gehirn_ts.mta.spf import SpfResult


def authentication_results(
    authserv_id: str, spf: SpfResult | None, dkim: list[DkimResult]
) -> bytes:
    """An Authentication-Results field (RFC 8601), CRLF-terminated."""
    return _authentication_results(authserv_id, spf, tuple(dkim))


# Most received mail repeats a few verdicts (the same SPF result for a sender's domain,
# no DKIM signature), and authres builds each field through several objects: 4% of a
# received message's processing (docs/performance.md, session 19).
@functools.lru_cache(maxsize=1024)
def _authentication_results(
    authserv_id: str, spf: SpfResult | None, dkim: tuple[DkimResult, ...]
) -> bytes:
    results: list[authres.AuthenticationResult] = []
    if spf is not None:
        if spf.identity == "mailfrom":
            results.append(
                authres.SPFAuthenticationResult(result=spf.result, smtp_mailfrom=spf.domain)
            )
        else:
            results.append(authres.SPFAuthenticationResult(result=spf.result, smtp_helo=spf.domain))
    for d in dkim:
        results.append(
            authres.DKIMAuthenticationResult(
                result=d.result, header_d=d.domain, header_s=d.selector
            )
        )
    if not dkim:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    header = authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=results)
    return str(header).encode("utf-8", "replace") + b"\r\n"
