"""Trace and result header fields the server adds (RFC 8601 via the authres library)."""

from __future__ import annotations

import math
from email.utils import formatdate

import authres

from gehirn_ts.mta.dkim import DkimResult
from gehirn_ts.mta.spf import SpfResult

_date: tuple[int, str] = (-1, "")


def date_text(seconds: float) -> str:
    """An RFC 5322 section 3.3 date-time in GMT, as ``email.utils.formatdate`` writes it."""
    global _date
    # The second formatdate shows: datetime rounds the time to the microsecond first.
    frac, whole = math.modf(seconds)
    second = int(whole) + (round(frac * 1e6) >= 1_000_000)
    if second != _date[0]:
        # Made once a second: formatdate was 1.4% of receiving's interpreter time.
        _date = (second, formatdate(second, usegmt=True))
    return _date[1]


def authentication_results(
    authserv_id: str, spf: SpfResult | None, dkim: list[DkimResult]
) -> bytes:
    """An Authentication-Results field (RFC 8601), CRLF-terminated."""
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
